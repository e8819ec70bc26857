"""Slurm launch for clusters: sbatch generation (submit), layout and memory checks, a distributed
health check (doctor), job status, and a real single-host Slurm cluster for tests (local_cluster).
The top layer: it reads configs and starts the trainer; nothing below imports it."""
