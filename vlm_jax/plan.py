"""Plan runs for Cloud TPU before anything is provisioned: compile each stage's real train step for a TPU topology
on this machine (ahead of time, through libtpu), read its HBM per chip, and estimate time and chip-hours.

`libtpu` (requirements-tpu.txt) lets JAX describe a TPU slice it does not have (`get_topology_desc`); lowering and
compiling the jitted step for a mesh of those devices gives XLA's exact per-device buffer sizes. Time is not read
from XLA (its cost analysis counts a scanned layer's body once): it is the FLOPs model (vlm_jax.flops) over the
slice's peak at an assumed MFU.
"""

import dataclasses
import functools
import os
import re
import time

import flax.linen as nn
import jax
import ml_collections

from vlm_jax import elastic, hardware, sharding
from vlm_jax import state as state_lib
from vlm_jax.models import llm as llm_lib

GiB = 2 ** 30

# The TPU generations a slice can be planned for, from the one chip table (HBM, bf16 peak, slice naming), and the
# other accelerator-type prefixes of each ('v5litepod-16' is a v5e slice).
CHIPS = {chip.name: chip for chip in hardware.CHIPS if chip.dims}
ALIASES = {alias: chip.name for chip in CHIPS.values() for alias in chip.slice_aliases}
# Chips -> torus shape, as Cloud TPU lays slices out (smallest first; v5e/v6e hosts hold 2x2 chips at least here).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}
SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# MFU assumed for time estimates: MaxText reports roughly 50-65% for dense LLM training on v5p/v5e at scale; a VLM
# step adds a frozen tower and a compressor at lower utilisation, so we assume less. A flag overrides it.
DEFAULT_MFU = 0.40


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str            # e.g. 'v5p-32'
    generation: str      # key of CHIPS
    chips: int
    topology: str        # get_topology_desc's name, e.g. 'v5p:2x2x4'

    @property
    def chip(self) -> hardware.Chip:
        return CHIPS[self.generation]


def parse_slice(name: str) -> Slice:
    """'v5p-32' / 'v5litepod-16' / 'v6e-8' / 'v4-64' (Cloud TPU accelerator types) -> Slice."""
    gen, _, size = name.partition("-")
    gen = ALIASES.get(gen, gen)
    if gen not in CHIPS or not size.isdigit():
        raise ValueError(f"unknown TPU slice {name!r}: expected GENERATION-SIZE with generation in "
                         f"{sorted(CHIPS) + sorted(ALIASES)}, e.g. v5p-32 or v5litepod-16")
    chip = CHIPS[gen]
    chips = int(size) // 2 if chip.cores_in_name else int(size)
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if chips not in shapes:
        smallest = min(shapes) * (2 if chip.cores_in_name else 1)
        raise ValueError(f"TPU slice {name!r} ({chips} chips) is not a shape this planner knows; sizes from "
                         f"{gen}-{smallest}: {[f'{gen}-{c * (2 if chip.cores_in_name else 1)}' for c in shapes]}")
    return Slice(name, gen, chips, f"{gen}:{shapes[chips]}")


def larger_slices(s: Slice) -> list[Slice]:
    """The same generation's listed slices above `s`, smallest first."""
    shapes = SHAPES_3D if s.chip.dims == 3 else SHAPES_2D
    factor = 2 if s.chip.cores_in_name else 1
    prefix = s.name.rsplit("-", 1)[0]
    return [parse_slice(f"{prefix}-{c * factor}") for c in sorted(shapes) if c > s.chips]


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str) -> tuple:
    """The devices of a TPU slice, described by libtpu on any machine (no TPU needed)."""
    # libtpu looks for a TPU of its own at start-up; these say there is none to find (silences its warnings).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5e-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu lets one process at a time hold a TPU (a lock file); describing one for compilation opens none, so
    # several planners (a test, the grid launcher, launch.plan) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu missing or the name unknown to it
        hint = "" if is_ready() else " Planning needs libtpu: pip install -r requirements-tpu.txt"
        raise RuntimeError(f"cannot describe TPU topology {topology!r}: {e}.{hint}") from e


@dataclasses.dataclass
class StagePlan:
    """One stage of one run, compiled for one slice."""
    slice: str
    mesh: dict
    devices: int
    chips: int
    arguments: int       # bytes per device: parameters, optimizer state, batch
    temporaries: int     # the rest of the peak but non-donated outputs: activations, XLA scratch, code
    code: int            # the compiled program
    total: int           # peak bytes per device
    capacity: int        # HBM per device
    peak_per_chip: float
    compile_seconds: float
    step_flops: float
    steps: int
    mfu: float
    error: str = ""
    out_of_memory: str = ""   # the compiler's own refusal: it will not assign more buffers than the chip holds
    program: str = ""         # elastic V: the program measured, e.g. 'm3 over V=(1, 4, 16)' or 'mqt V=16'

    @property
    def fits(self) -> bool:
        return not self.error and not self.out_of_memory and self.total <= self.capacity

    @property
    def step_seconds(self) -> float:
        return self.step_flops / (self.chips * self.peak_per_chip * self.mfu)

    @property
    def hours(self) -> float:
        return self.steps * self.step_seconds / 3600

    @property
    def chip_hours(self) -> float:
        return self.hours * self.chips


def heaviest_program(run_cfg: ml_collections.ConfigDict) -> tuple:
    """(key of `state.jit_train_steps`, label) of the program whose memory a run needs: the largest sum of scales
    (elastic V: M3's one program, MQT's V_max; fixed V: the one step, labelled '')."""
    name = elastic.mode(run_cfg)
    if not name:
        return None, ""
    programs = elastic.MODES[name].programs(elastic.tokens(run_cfg))
    key = max(programs, key=lambda k: sum(programs[k]))
    scales = programs[key]
    return key, f"{name} over V={scales}" if len(scales) > 1 else f"{name} V={scales[0]}"


def plan_stage(run_cfg: ml_collections.ConfigDict, slice_name: str, mfu: float = DEFAULT_MFU) -> StagePlan:
    """Compile `run_cfg`'s train step (the one `train.run` runs: vlm_jax.state.jit_train_steps, its heaviest
    program under elastic V) for `slice_name` and measure it."""
    run_cfg = run_cfg.copy_and_resolve_references()
    run_cfg.model.llm.scan_layers = llm_lib.scans_layers(run_cfg.model.llm, "tpu")   # as the TPU worker runs it
    s = parse_slice(slice_name)
    devices = topology_devices(s.topology)
    mesh = sharding.make_mesh(run_cfg.mesh, list(devices))
    t = run_cfg.train
    capacity = s.chip.hbm_bytes * s.chips // len(devices)
    key, program = heaviest_program(run_cfg)
    base = dict(slice=slice_name, mesh={k: int(v) for k, v in mesh.shape.items()}, devices=len(devices),
                chips=s.chips, capacity=capacity, peak_per_chip=s.chip.peak_bf16, steps=int(t.steps), mfu=mfu,
                program=program)
    t0, trainable = time.perf_counter(), set()
    try:
        layout = state_lib.state_layout(run_cfg.model, t, mesh, strict_mesh=run_cfg.mesh.get("strict", False))
        abstract = layout[1]
        trainable = set(abstract.params)   # top-level parts this stage trains
        step = state_lib.jit_train_steps(run_cfg, mesh, layout)[key]
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            compiled = step.lower(abstract, state_lib.abstract_batch(run_cfg, mesh)).compile()
        ma = compiled.memory_analysis()
    except Exception as e:  # a cell that cannot compile (e.g. a dimension the mesh cannot split) is a finding
        message = str(e).splitlines()[0][:300]
        needed = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
        if "RESOURCE_EXHAUSTED" in message and needed:   # does not fit: a finding with a size, not a failure
            return StagePlan(**base, arguments=0, temporaries=int(float(needed.group(1)) * GiB), code=0,
                             total=int(float(needed.group(1)) * GiB), compile_seconds=time.perf_counter() - t0,
                             step_flops=state_lib.step_flops(run_cfg, trainable),
                             out_of_memory=message)
        return StagePlan(**base, arguments=0, temporaries=0, code=0, total=0, compile_seconds=time.perf_counter()
                         - t0, step_flops=0.0, error=f"{type(e).__name__}: {message}")
    seconds = time.perf_counter() - t0
    step_flops = state_lib.step_flops(run_cfg, trainable)
    arguments, outputs = ma.argument_size_in_bytes, max(ma.output_size_in_bytes - ma.alias_size_in_bytes, 0)
    # The TPU compiler reports the peak of its buffer assignment (temp_size is 0 there); other backends the parts.
    total = getattr(ma, "peak_memory_in_bytes", 0) or (arguments + outputs + ma.temp_size_in_bytes
                                                       + ma.generated_code_size_in_bytes)
    return StagePlan(**base, arguments=arguments, temporaries=max(total - arguments - outputs, 0),
                     code=ma.generated_code_size_in_bytes, total=total, compile_seconds=seconds,
                     step_flops=step_flops)


def suggest(run_cfg: ml_collections.ConfigDict, plan: StagePlan, mfu: float = DEFAULT_MFU,
            max_tries: int = 3) -> tuple[str, StagePlan] | None:
    """A change that makes a stage that does not fit fit, tried by compiling: full rematerialisation (when the LLM
    is not already rematerialised), then the same generation's larger slices, smallest first. None if none did."""
    tries = []
    if run_cfg.model.llm.remat != "full":
        cfg = ml_collections.ConfigDict(run_cfg.to_dict())
        cfg.model.llm.remat = "full"
        tries.append(("model.llm.remat=full", cfg, plan.slice))
    tries += [(f"slice {s.name}", run_cfg, s.name) for s in larger_slices(parse_slice(plan.slice))]
    for label, cfg, slice_name in tries[:max_tries]:
        candidate = plan_stage(cfg, slice_name, mfu)
        if candidate.fits:
            return label, candidate
    return None


def format_row(name: str, stage: str, p: StagePlan, suggestion: str = "") -> str:
    mesh = "x".join(str(p.mesh[a]) for a in ("data", "fsdp", "tensor"))
    if p.error:
        return f"{name:<22} {stage:<7} {p.slice:<13} {mesh:<8} does not compile: {p.error}"
    gib = lambda b: b / GiB  # noqa: E731
    fits = "yes" if p.fits else ("OOM" if p.out_of_memory else "NO")
    line = (f"{name:<22} {stage:<7} {p.slice:<13} {mesh:<8} {gib(p.arguments):7.2f} {gib(p.temporaries):7.2f} "
            f"{gib(p.total):7.2f} /{gib(p.capacity):6.1f}  {fits:<4} {p.compile_seconds:6.0f} {p.step_flops:9.3g} "
            f"{p.step_seconds:7.2f} {p.hours:7.1f} {p.chip_hours:9.0f}")
    return line + (f"   {p.program}" if p.program else "") + (f"   -> fits with {suggestion}" if suggestion else "")


HEADER = (f"{'cell':<22} {'stage':<7} {'slice':<13} {'mesh':<8} {'args':>7} {'temp':>7} {'total':>7} "
          f"{'/HBM GiB':>7}  {'fits':<4} {'comp s':>6} {'FLOPs/st':>9} {'step s':>7} {'hours':>7} {'chip-h':>9}")


def is_ready() -> bool:
    """Whether libtpu is installed (planning works)."""
    try:
        import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return True
    except ImportError:
        return False



def plan_jobs(jobs, slice_for, mfu: float = DEFAULT_MFU, try_fixes: bool = True, echo=print) -> list[dict]:
    """Plan every stage of every grid job (vlm_jax.grid.spec.GridJob) on the slice `slice_for(job name)` gives;
    echoes the table with progress and ETA; returns one dict per (job, stage) with the measured figures."""
    rows, started = [], time.perf_counter()
    total = sum(len(job.spec["stages"]) for job in jobs)
    echo(HEADER)
    for job in jobs:
        for stage in job.spec["stages"]:
            cfg = ml_collections.ConfigDict(stage["config"])
            p = plan_stage(cfg, slice_for(job.name), mfu)
            fix = suggest(cfg, p, mfu) if try_fixes and not p.fits and not p.error else None
            rows.append(dict(cell=job.name, stage=stage["name"], **dataclasses.asdict(p), fits=p.fits,
                             step_seconds=p.step_seconds, hours=p.hours, chip_hours=p.chip_hours,
                             fix=fix[0] if fix else "", fix_chip_hours=fix[1].chip_hours if fix else 0.0))
            done = len(rows)
            eta = (time.perf_counter() - started) / done * (total - done)
            fixed = f"{fix[0]} ({fix[1].total / GiB:.1f} GiB per device, {fix[1].chip_hours:.0f} chip-h)" if fix else ""
            echo(format_row(job.name, stage["name"], p, fixed)
                 + (f"   [{done}/{total}, ETA {eta / 60:.0f} min]" if done < total else ""))
    fitting = [r for r in rows if r["fits"]]
    echo(f"{len(fitting)}/{len(rows)} stages fit; {sum(r['chip_hours'] for r in fitting):,.0f} chip-hours for "
         f"those at MFU {mfu:.2f} (training only); compiled in {time.perf_counter() - started:.0f} s")
    return rows


def why_unfit(stages: list, slice_name: str, mfu: float = DEFAULT_MFU) -> str:
    """'' when every stage ({name, config}) compiles and fits `slice_name`, else the first failure, in words."""
    for stage in stages:
        p = plan_stage(ml_collections.ConfigDict(stage["config"]), slice_name, mfu)
        if not p.fits:
            return f"stage {stage['name']} on {p.slice}: " + (
                f"does not compile ({p.error})" if p.error else
                f"needs {'at least ' if p.out_of_memory else ''}{p.total / GiB:.1f} GiB per device, "
                f"{p.capacity / GiB:.1f} GiB available")
    return ""
