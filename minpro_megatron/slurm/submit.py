"""Generate and submit Slurm jobs for a run config: one training job, or a sweep (job array + collector).

    minpro-slurm submit CONFIG [overrides...] [--nodes N] [--rollout-nodes R] [--run-dir DIR] [--dry-run]
    minpro-slurm sweep  CONFIG [overrides...] --methods grpo,minpro --staleness 0,1,2,4 --seeds 1,2 [--dry-run]
    minpro-slurm status JOB_ID                 # state, exit code and reason from scontrol (no accounting needed)

Everything is checked before submission (``layout.plan_layout``: GPUs x nodes against TP*PP*CP*DP, TP
inside a node, EP dividing the experts, ...) and the memory estimate is printed. The run directory
(``<slurm.output_root>/<slurm.job_name>`` or ``--run-dir``) is created first and receives the job files:
``job.sbatch`` (from launch_slurm/job.sbatch.tmpl), ``learner.sh`` and ``rollout.sh`` (per-node
launchers), ``config.yaml`` (the resolved config the job runs) and, for sweeps, ``tasks.txt`` and
``collect.sbatch``. Copies, so later edits to the repository do not change a queued job.

Length: the job script is rendered here piece by piece (header, container, rollout block, learner block), each piece a short function; splitting them would scatter one file format over several modules.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from minpro_megatron.config import ConfigError, RunConfig, load_config, to_dict
from minpro_megatron.slurm.layout import JobLayout, plan_layout
from minpro_megatron.slurm.memory import format_memory
from minpro_megatron.slurm.validate import check_job_fields, check_run_dir, mask_env_lines

__all__ = ["JobFiles", "SweepTask", "build_job", "sweep_tasks", "render", "main", "TEMPLATE_DIR"]

TEMPLATE_DIR = Path(os.environ.get("MINPRO_SLURM_TEMPLATES", Path(__file__).resolve().parents[2] / "launch_slurm"))
PROGRAMS = {"train": ["-m", "minpro_megatron.cli", "train"], "doctor": ["-m", "minpro_megatron.slurm.doctor"]}


@dataclass
class SweepTask:
    name: str
    overrides: list[str]


@dataclass
class JobFiles:
    run_dir: Path
    layout: JobLayout
    files: dict[str, str] = field(default_factory=dict)  # file name -> text, written into run_dir
    summary: list[str] = field(default_factory=list)

    def write(self) -> None:
        """Scripts 0700, everything else (config.yaml holds slurm.env values) 0600: only the submitting user
        reads them. Each file is written under a temporary name with its final mode, then renamed."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)  # --output needs it before sbatch
        for name, text in self.files.items():
            path = self.run_dir / name
            mode = 0o700 if name.endswith((".sh", ".sbatch")) else 0o600
            tmp = path.with_name(f".{name}.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, mode)  # the umask may have removed bits of ``mode``; never adds any
            os.replace(tmp, path)


def render(template: str, values: dict[str, str]) -> str:
    """Replace ``{{name}}``; a placeholder without a value is an error (a template/generator mismatch)."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without values: {', '.join(missing)}")
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)
    return re.sub(r"\n{3,}", "\n\n", text)  # empty optional blocks leave no gaps


def _template(name: str) -> str:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"Slurm template {path} not found: set MINPRO_SLURM_TEMPLATES to the "
                                "launch_slurm/ directory of a minpro_megatron checkout")
    return path.read_text()


def _q(text: str | os.PathLike) -> str:
    return shlex.quote(str(text))


def _sbatch_header(cfg: RunConfig, layout: JobLayout | None, output: str, name: str, array: str | None = None) -> str:
    """#SBATCH lines; ``layout`` None: the collector's single small task."""
    s = cfg.slurm
    lines = [f"--job-name={name}"]
    if layout is not None:
        lines += [f"--nodes={layout.nodes}", "--ntasks-per-node=1"]
        if s.gpus_per_node:
            lines.append(f"--gpus-per-node={s.gpus_per_node}")
        if s.cpus_per_node:
            lines.append(f"--cpus-per-task={s.cpus_per_node}")
        if s.exclusive:
            lines.append("--exclusive")
        lines.append(f"--time={s.time}")
    else:  # the collector: one small task
        lines += ["--nodes=1", "--ntasks=1", "--time=00:30:00"]
    for opt in ("partition", "account", "qos"):
        if getattr(s, opt):
            lines.append(f"--{opt}={getattr(s, opt)}")
    lines += [f"--output={output}", "--open-mode=append"]  # a requeued run appends to the same log
    if layout is not None:
        if s.requeue:
            lines.append("--requeue")
        if s.signal_seconds:
            lines.append(f"--signal=B:USR1@{s.signal_seconds}")
    if array:
        lines.append(f"--array={array}")
    if layout is not None:
        lines += list(s.extra_sbatch)
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _container_setup(cfg: RunConfig) -> str:
    """Pyxis/enroot flags as a bash array CONTAINER (empty string without a container image)."""
    s = cfg.slurm
    if not s.container_image:
        return ""
    root = Path(s.output_root).resolve()
    mounts = list(dict.fromkeys([*s.container_mounts, f"{root}:{root}"]))  # run files at the same path
    flags = [f"--container-image={_q(s.container_image)}", f"--container-mounts={_q(','.join(mounts))}"]
    if s.container_workdir:
        flags.append(f"--container-workdir={_q(s.container_workdir)}")
    return ("\n# Every step runs in this container (pyxis); the run directory is mounted at the same path.\n"
            f"CONTAINER=({' '.join(flags)})")


def _setup_lines(cfg: RunConfig) -> str:
    lines = list(cfg.slurm.setup)
    lines += [f"export {k}={_q(v)}" for k, v in cfg.slurm.env.items()]
    return ("\n" + "\n".join(lines)) if lines else ""


def _python(cfg: RunConfig) -> str:
    if cfg.slurm.python:
        return cfg.slurm.python
    return "python" if cfg.slurm.container_image else sys.executable


def _rollout_block(cfg: RunConfig, layout: JobLayout, container: str, array: bool = False) -> str:
    """The rollout part of job.sbatch; ``container`` is ' "${CONTAINER[@]}"' or ''; ``array``: a sweep's
    job array, whose task k shifts its ports (``_array_ports``)."""
    if not layout.rollout_nodes:
        return ""
    s, r = cfg.slurm, cfg.rollout
    router = r.use_router
    base_port, router_port = str(r.base_port), str(r.router_port) if router else ""
    ports_note = ""
    if array and r.base_port:
        # array tasks sharing a node (slurm.exclusive=false) must not share ports; checked by _array_ports
        base_port = f"$(({r.base_port} + SLURM_ARRAY_TASK_ID * {layout.num_servers}))"
        router_port = f"$(({r.router_port} + 2 * SLURM_ARRAY_TASK_ID))" if router else ""
        ports_note = (f"\n# Array task k serves on base port + k x {layout.num_servers} and runs the router on router "
                      "port + 2k (+1: its metrics): tasks that share a node never share a port.")
    in_env = f'srun --overlap --nodes=1 --ntasks=1 --nodelist="${{NODES[0]}}"{container} ' if container else ""
    server_args = ["--dtype", r.server_dtype]  # rollout.sh labels the weights: 0 (the learner's step 0), or "restarted"
    if r.server_max_total_tokens:
        server_args += ["--max-total-tokens", str(r.server_max_total_tokens)]
    args = " ".join(_q(a) for a in [*server_args, *r.server_extra_args])
    router_note = "; the router on the first" if router else ""
    router_url = '\nOVERRIDES+=("rollout.router_url=$(cat "$ROLLOUT_DIR/router_url.txt")")' if router else ""
    return f"""
# Rollout fleet (rollout.sh): {layout.servers_per_node} SGLang server(s) of TP {layout.rollout_tp} on each of the last {layout.rollout_nodes} node(s){router_note}.
# The learner gets their URLs as rollout.server_urls once every one answers /health.{ports_note}
export ROLLOUT_MODEL={_q(cfg.model.hf_path)} ROLLOUT_TP={layout.rollout_tp} SERVERS_PER_NODE={layout.servers_per_node}
export ROLLOUT_BASE_PORT={base_port} SERVER_MODULE={_q(s.rollout_server_module)} ROLLOUT_DEVICE={r.server_device}
export ROUTER_PORT={router_port} ROUTER_POLICY={_q(r.router_policy)} ROLLOUT_SERVER_RESTARTS={3 if r.restart_dead_servers else 0}
ROLLOUT_NODES=$(IFS=,; echo "${{NODES[*]:N_LEARNER}}")
ROLLOUT_DIR=$RUN_DIR/rollout/$SLURM_JOB_ID
mkdir -p "$ROLLOUT_DIR"
# The servers and the router listen on node addresses: a per-job API key (0600; $MINPRO_API_KEY when
# slurm.env sets it) that every request must carry (rollout/auth.py). rollout.sh passes it on.
export MINPRO_API_KEY_FILE=$ROLLOUT_DIR/api_key
rm -f "$MINPRO_API_KEY_FILE" "$MINPRO_API_KEY_FILE.sglang.yaml"
(
  umask 077
  KEY=${{MINPRO_API_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')}}
  [[ $KEY =~ ^[A-Za-z0-9._~+/=-]{{16,512}}$ ]] || {{ echo "MINPRO_API_KEY: 16-512 of [A-Za-z0-9._~+/=-]" >&2; exit 1; }}
  printf '%s\\n' "$KEY" >"$MINPRO_API_KEY_FILE"
  printf 'api-key: %s\\n' "$KEY" >"$MINPRO_API_KEY_FILE.sglang.yaml"
)
OVERRIDES+=("rollout.api_key_file=$MINPRO_API_KEY_FILE")
srun --nodes={layout.rollout_nodes} --ntasks={layout.rollout_nodes} --ntasks-per-node=1 --nodelist="$ROLLOUT_NODES" \\
  {_cpus(cfg)}{container} bash "$JOB_FILES/rollout.sh" "$ROLLOUT_DIR" {args} &
ROLLOUT=$!
{in_env}"$PYTHON" -m minpro_megatron.slurm.fleet wait "$ROLLOUT_DIR" --servers {layout.num_servers}{" --router" if router else ""} --timeout {r.server_startup_timeout_s:g} \\
  --api-key-file "$MINPRO_API_KEY_FILE"
OVERRIDES+=("rollout.server_urls=[$(paste -sd, "$ROLLOUT_DIR/server_urls.txt")]"){router_url}
"""


def _cpus(cfg: RunConfig) -> str:
    # srun does not inherit the job's CPUs per task (Slurm 22.05+): without this a task gets one core
    return f"--cpus-per-task={cfg.slurm.cpus_per_node or '$SLURM_CPUS_ON_NODE'}"


def _after_learner(cfg: RunConfig, layout: JobLayout) -> str:
    lines = []
    if layout.rollout_nodes:
        lines.append("kill $ROLLOUT 2>/dev/null || true  # stop the rollout servers")
    if cfg.slurm.requeue and cfg.slurm.signal_seconds:
        lines += [
            "# Time limit ahead (USR1) and a clean save: requeue; the next run resumes from $CKPT_DIR.",
            "# TERM (scancel, preemption) just ends here: a preempting scheduler requeues by itself.",
            'if [ $RC = 0 ] && [ "$(cat "$MINPRO_STOP_FILE" 2>/dev/null)" = USR1 ]; then',
            '  echo "[$(date +%T)] requeueing job $SLURM_JOB_ID to resume from $CKPT_DIR"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    return "\n".join(lines)


def _check_slurm_rules(cfg: RunConfig) -> None:
    s = cfg.slurm
    if not s.exclusive and not s.cpus_per_node:
        raise ConfigError("slurm.exclusive=false needs slurm.cpus_per_node (CPUs per node for the launcher); "
                          "otherwise each node's torchrun would get a single core")
    check_job_fields(cfg)  # every value written unquoted into the job files


def _array_ports(cfg: RunConfig, layout: JobLayout, n_tasks: int) -> None:
    """Task k of a sweep array serves on base_port + k * servers and routes on router_port + 2k (+1 metrics):
    every port must exist, and where tasks may share nodes the two ranges must not meet."""
    r = cfg.rollout
    if not layout.rollout_nodes or not r.base_port or n_tasks < 2:
        return
    servers = range(r.base_port, r.base_port + n_tasks * layout.num_servers)
    routers = range(r.router_port, r.router_port + 2 * n_tasks) if r.use_router else range(0)
    top = max(servers[-1], routers[-1] if routers else 0)
    if top > 65535:
        raise ConfigError(f"a sweep of {n_tasks} tasks needs ports up to {top} (task k: rollout.base_port + k x "
                          f"{layout.num_servers} servers, rollout.router_port + 2k): lower rollout.base_port / router_port")
    if not cfg.slurm.exclusive and routers and servers.start < routers.stop and routers.start < servers.stop:
        raise ConfigError(f"rollout.router_port={r.router_port}: the routers of {n_tasks} array tasks (ports "
                          f"{routers.start}-{routers.stop - 1}) meet their servers' ports ({servers.start}-{servers.stop - 1}), "
                          "and slurm.exclusive=false lets tasks share a node: move rollout.router_port outside that range")


def build_job(cfg: RunConfig, run_dir: Path, command: str, tasks: list[SweepTask] | None = None) -> JobFiles:
    """Check the layout and render every file of the job (nothing is written or submitted)."""
    _check_slurm_rules(cfg)
    layout = plan_layout(cfg)
    _array_ports(cfg, layout, len(tasks or []))
    s = cfg.slurm
    run_dir = run_dir.resolve()
    check_run_dir(str(run_dir))
    container = ' "${CONTAINER[@]}"' if s.container_image else ""
    program = PROGRAMS[s.program] + list(s.program_args)
    title = (f"Sweep of {len(tasks)} runs" if tasks else "Training run") + f" '{s.job_name}' ({s.program})"
    summary = layout.summary()
    values = {
        "title": title, "command": command, "python": _q(_python(cfg)), "job_files": _q(run_dir),
        "learner_nodes": str(layout.learner_nodes), "procs_per_node": str(layout.ranks_per_node),
        # jobs sharing a node (and emulated nodes sharing a host) must not share the rendezvous port
        "master_port": f"$(({s.master_port} + SLURM_JOB_ID % 1000))",
        "summary": "\n".join(f"# {line}" for line in summary), "setup": _setup_lines(cfg),
        "srun_flags": _cpus(cfg) + container, "container_setup": _container_setup(cfg), "program": " ".join(_q(a) for a in program),
        "rollout_block": _rollout_block(cfg, layout, container, array=bool(tasks)), "after_learner": _after_learner(cfg, layout),
    }
    files: dict[str, str] = {}
    if tasks:
        values["sbatch_header"] = _sbatch_header(
            cfg, layout, str(run_dir / "logs" / "%x-%A_%a.out"), s.job_name,
            array=f"0-{len(tasks) - 1}" + (f"%{s.array_max_parallel}" if s.array_max_parallel else ""))
        values["run_dir"] = "\n".join([
            '# Array task $SLURM_ARRAY_TASK_ID runs line $SLURM_ARRAY_TASK_ID+1 of tasks.txt: "NAME OVERRIDE..."',
            'read -r TASK_NAME TASK_ARGS <<<"$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$JOB_FILES/tasks.txt")"',
            'read -ra TASK_OVERRIDES <<<"$TASK_ARGS"',
            f"RUN_DIR={_q(run_dir / 'runs')}/$TASK_NAME",
            'mkdir -p "$RUN_DIR"',
            'echo "$TASK_ARGS" >"$RUN_DIR/overrides.txt"',
            'echo "sweep task $SLURM_ARRAY_TASK_ID: $TASK_NAME: $TASK_ARGS"',
        ])
        values["task_overrides"] = '"${TASK_OVERRIDES[@]}" '
        files["tasks.txt"] = "".join(f"{t.name} {' '.join(t.overrides)}\n" for t in tasks)
        collect = s.collect_command.format(python='"$PYTHON"', runs_dir=_q(run_dir / "runs"), sweep_dir=_q(run_dir))
        if container:
            collect = f"{_container_setup(cfg).strip()}\nsrun --ntasks=1{container} bash -c {_q(collect)}"
        files["collect.sbatch"] = render(_template("collect.sbatch.tmpl"), {
            "sbatch_header": _sbatch_header(cfg, None, str(run_dir / "logs" / "collect-%j.out"),
                                            f"{s.job_name}-collect"),
            "title": f"Collector of sweep '{s.job_name}' ({len(tasks)} runs in {run_dir / 'runs'})",
            "setup": _setup_lines(cfg), "python": _q(_python(cfg)), "sweep_dir": _q(run_dir), "collect": collect,
        })
    else:
        values["sbatch_header"] = _sbatch_header(cfg, layout, str(run_dir / "logs" / "slurm-%j.out"), s.job_name)
        values["run_dir"] = f"RUN_DIR={_q(run_dir)}"
        values["task_overrides"] = ""
    files["job.sbatch"] = render(_template("job.sbatch.tmpl"), values)
    files["learner.sh"] = _template("learner.sh")
    if layout.rollout_nodes:
        files["rollout.sh"] = _template("rollout.sh")
    files["config.yaml"] = yaml.safe_dump(to_dict(cfg), sort_keys=False)  # the job needs the real env values
    summary += format_memory(cfg, layout.world_size)
    return JobFiles(run_dir=run_dir, layout=layout, files=files, summary=summary)


def sweep_tasks(cfg_path: str | None, overrides: Sequence[str], grid: dict[str, list[str]]) -> list[SweepTask]:
    """One task per point of the grid (cartesian product, in the given key order); each is validated."""
    if not grid:
        raise ConfigError("a sweep needs at least one axis: --methods, --staleness, --seeds or --grid KEY=V1,V2")
    short = {"loss.name": "", "rollout.staleness.n": "n", "train.seed": "s"}
    tasks = []
    for values in itertools.product(*grid.values()):
        ovr = [f"{k}={v}" for k, v in zip(grid, values)]
        name = "-".join(f"{short.get(k, k.rsplit('.', 1)[-1] + '_')}{v}" for k, v in zip(grid, values))
        for o in ovr:
            if any(c.isspace() for c in o):
                raise ConfigError(f"sweep value {o!r} contains whitespace; tasks.txt separates overrides by spaces")
        try:
            plan_layout(load_config(cfg_path, [*overrides, *ovr]))
        except ConfigError as exc:
            raise ConfigError(f"sweep task {name} ({' '.join(ovr)}): {exc}") from None
        tasks.append(SweepTask(name=re.sub(r"[^A-Za-z0-9_.=-]", "_", name), overrides=ovr))
    return tasks


def _sbatch(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd)
    if proc.returncode:
        raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


COMMANDS = {"submit": "one training job (learner + rollout nodes)",
            "sweep": "a job array over methods x staleness x seeds, then a collector job (afterany)",
            "status": "state and exit code of a job (scontrol; works without Slurm accounting)"}


def _parser(cmd: str) -> argparse.ArgumentParser:
    from minpro_megatron.cli_support import Parser

    p = Parser(prog=f"minpro-slurm {cmd}", description=COMMANDS[cmd])
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. slurm.partition=gpu optim.lr=1e-6")
    p.add_argument("--nodes", type=int, help="learner nodes (slurm.learner_nodes)")
    p.add_argument("--rollout-nodes", type=int, help="rollout nodes (slurm.rollout_nodes)")
    p.add_argument("--run-dir", type=Path, help="default: <slurm.output_root>/<slurm.job_name>[-sweep]")
    p.add_argument("--doctor", action="store_true", help="run the distributed health check instead of training")
    p.add_argument("--dry-run", action="store_true", help="check, print the plan and the job script; write nothing")
    p.add_argument("--no-submit", action="store_true", help="write the run directory but do not call sbatch")
    if cmd == "sweep":
        p.add_argument("--methods", help="loss.name values, comma-separated")
        p.add_argument("--staleness", help="rollout.staleness.n values, comma-separated")
        p.add_argument("--seeds", help="train.seed values, comma-separated")
        p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="any other axis")
        p.add_argument("--collect-cmd", help="collector command ({python}, {runs_dir}, {sweep_dir} are filled)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"error: minpro-slurm: unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
              + f"; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in COMMANDS:
        print("usage: minpro-slurm {submit,sweep,status} CONFIG [overrides...] [options]  (-h after a command for help)\n"
              + "\n".join(f"  {k:<7} {v}" for k, v in COMMANDS.items()), file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    if argv[0] == "status":
        from minpro_megatron.slurm.status import main as status_main

        return status_main(argv[1:])
    args = _parser(argv[0]).parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"slurm.learner_nodes={args.nodes}")
    if args.rollout_nodes is not None:
        overrides.append(f"slurm.rollout_nodes={args.rollout_nodes}")
    if args.doctor:
        overrides.append("slurm.program=doctor")
    try:
        cfg = load_config(args.config, overrides)
        tasks = None
        if args.cmd == "sweep":
            grid: dict[str, list[str]] = {}
            for key, opt in (("loss.name", args.methods), ("rollout.staleness.n", args.staleness),
                             ("train.seed", args.seeds)):
                if opt:
                    grid[key] = [v for v in opt.split(",") if v]
            for g in args.grid:
                key, _, vals = g.partition("=")
                if not vals:
                    raise ConfigError(f"--grid {g!r} must look like KEY=V1,V2 (e.g. optim.lr=1e-6,3e-6)")
                grid[key] = vals.split(",")
            if args.collect_cmd:
                cfg.slurm.collect_command = args.collect_cmd
            tasks = sweep_tasks(args.config, overrides, grid)
        default = cfg.slurm.job_name + ("-sweep" if args.cmd == "sweep" else "")
        run_dir = args.run_dir or Path(cfg.slurm.output_root) / default
        job = build_job(cfg, run_dir, args.cmd, tasks)
    except ConfigError as exc:
        print(f"error: config error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    print(f"== minpro-slurm {args.cmd}{' (dry run)' if args.dry_run else ''}: {args.config} ==")
    for line in job.summary:
        print(line)
    if tasks:
        print(f"sweep: {len(tasks)} array tasks, then a collector job (afterany):")
        for i, t in enumerate(tasks):
            print(f"  [{i}] {t.name}: {' '.join(t.overrides)}")
    print(f"run dir: {job.run_dir}")
    if args.dry_run:
        print("---- job.sbatch ----")  # secret-looking slurm.env values (*KEY*, *TOKEN*, ...) as '***'
        print(mask_env_lines(job.files["job.sbatch"], cfg.slurm.env), end="")
        if tasks:
            print("---- collect.sbatch ----")
            print(mask_env_lines(job.files["collect.sbatch"], cfg.slurm.env), end="")
        print("dry run: nothing written or submitted")
        return 0

    if not args.no_submit:  # before anything is written: sbatch must exist and reach its controller
        from minpro_megatron.slurm.status import check_slurm_reachable

        check_slurm_reachable()
    if (job.run_dir / "config.yaml").exists():
        print("run dir exists: the job resumes from its checkpoints if there are any")
    job.write()
    if args.no_submit:
        print(f"written, not submitted: sbatch {job.run_dir / 'job.sbatch'}"
              + (f" && sbatch --dependency=afterany:<array id> {job.run_dir / 'collect.sbatch'}" if tasks else ""))
        return 0
    job_id = _sbatch([str(job.run_dir / "job.sbatch")])
    ids = [job_id]
    if tasks:
        ids.append(_sbatch([f"--dependency=afterany:{job_id}", "--kill-on-invalid-dep=yes",
                            str(job.run_dir / "collect.sbatch")]))
        print(f"submitted array job {job_id} ({len(tasks)} tasks) and collector job {ids[1]}")
    else:
        print(f"submitted job {job_id}; log: {job.run_dir / 'logs' / f'slurm-{job_id}.out'}")
    with open(job.run_dir / "submissions.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {args.cmd} {' '.join(ids)}\n")
    print(f"job ids: {' '.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
