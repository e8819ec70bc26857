"""Slurm launch for clusters: sbatch generation (submit), layout and memory checks, a distributed
health check (doctor), preemption handling and a real single-host Slurm cluster for tests (local_cluster).

Modules import lazily from here on purpose: ``minpro_megatron.config`` imports ``slurm.config``.
"""
