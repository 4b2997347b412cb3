"""`telechat2 plan` and `telechat2 check-config`."""
from __future__ import annotations

import json
import sys

from ..config import PRESETS
from ..errors import TeleChat2Error
from ..options import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from .hardware import ATLAS_800T_A2, Hardware
from .model import Estimate, estimate


def _positive(name, value, kind=float):
    if value is None:
        return None
    if not value > 0:
        raise TeleChat2Error(f"{name} must be > 0, got {value}")
    return kind(value)


def _hardware(args) -> Hardware:
    hw = ATLAS_800T_A2.with_(hbm_gb=_positive("--hbm-gb", args.hbm_gb), peak_tflops=_positive("--peak-tflops",
                                                                                                args.peak_tflops))
    if hw.budget_gb <= 0:
        raise TeleChat2Error(f"--hbm-gb {hw.hbm_gb:g} leaves nothing after the {hw.reserved_gb:g} GB the runtime keeps")
    return hw


def _table(rows: list[Estimate]) -> str:
    head = (f"{'#':>3} {'dp':>4} {'tp':>3} {'pp':>3} {'cp':>3} {'mb':>4} {'vpp':>3} {'sp':>3} {'zero':>4} "
            f"{'recompute':>9} {'bubble':>6} {'mem GB':>7} {'fits':>4} {'step s':>8} {'tok/s/p':>8} {'MFU':>6}")
    out = [head]
    for i, e in enumerate(rows, 1):
        j = e.to_json()
        out.append(f"{i:>3} {j['dp']:>4} {j['tp']:>3} {j['pp']:>3} {j['cp']:>3} {j['micro_batch_num']:>4} "
                   f"{j['vpp']:>3} {'on' if j['sequence_parallel'] else '-':>3} "
                   f"{'on' if j['optimizer_shard'] else '-':>4} {j['recompute']:>9} "
                   f"{j['pipeline_bubble_fraction']:>6.3f} {e.memory_gb:>7.1f} "
                   f"{'yes' if e.fits else 'NO':>4} {e.step_time_s:>8.3f} {e.tokens_per_s_per_device:>8.1f} "
                   f"{100 * e.mfu:>5.1f}%")
    return "\n".join(out)


def _emit(rows: list[Estimate], args, header: str) -> None:
    if args.format == "json":
        print(json.dumps([e.to_json() for e in rows], indent=1))
    else:
        print(header)
        print(_table(rows))


def cmd_plan(args) -> int:
    import warnings
    with warnings.catch_warnings(record=True) as caught:      # validate_layout's notes, printed once, plainly
        warnings.simplefilter("always")
        code = _plan(args)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"telechat2 plan: warning: {message}", file=sys.stderr)
    return code


def _plan(args) -> int:
    from .search import parse_layout, plans_for_layout, planning_config, rank, search
    devices = _positive("--devices", args.devices, int)
    seq = _positive("--seq-length", args.seq_length, int)
    mbs = _positive("--micro-batch-size", args.micro_batch_size, int)
    gb = _positive("--global-batch", args.global_batch, int)
    hw = _hardware(args)
    c = planning_config(args.model, seq, args.amp)
    header = (f"TeleChat2-{args.model} ({c.num_parameters() / 1e9:.2f}B), {devices} devices, seq {seq}, AMP "
              f"{args.amp}; {hw.name}: peak {hw.peak_tflops:g} TFLOPS x efficiency {hw.efficiency}, "
              f"{hw.budget_gb:g} GB per device for the model ({hw.hbm_gb:g} GB - {hw.reserved_gb:g} reserved)")
    if args.layout is not None:
        spec = parse_layout(args.layout)
        ests = rank([estimate(c, p, seq, hw) for p in plans_for_layout(spec, c, devices, seq, gb, mbs)])
        fitting = [e for e in ests if e.fits]
        chosen = fitting[0] if fitting else min(ests, key=lambda e: e.memory_gb)
        _emit([chosen], args, header)
        if args.balance:
            return _print_balance(c, chosen.plan, seq, hw)
        if not chosen.fits:
            print(f"telechat2 plan: refused: {chosen.plan.describe()} needs {chosen.memory_gb:.1f} GB per device, "
                  f"more than the {hw.budget_gb:g} GB available", file=sys.stderr)
            return 1
        return 0
    global_batch = gb or devices
    ests = search(c, devices, seq, hw, global_batch=global_batch, micro_batch_size=mbs)
    if not ests:
        raise TeleChat2Error(f"no valid layout of {devices} devices for TeleChat2-{args.model} at seq {seq} with "
                             f"global batch {global_batch} (micro-batch size {mbs}); see `telechat2 plan --help`")
    fitting = [e for e in ests if e.fits]
    header += f"\nglobal batch {global_batch} sequences; {len(ests)} valid layouts, {len(fitting)} fit in memory"
    shown = ests if args.all else fitting
    if args.top:
        shown = shown[:args.top]
    if not fitting:
        smallest = sorted(ests, key=lambda e: e.memory_gb)[:args.top or None]
        _emit(smallest if not args.all else shown, args, header)
        print(f"telechat2 plan: refused: no layout fits; the smallest needs {smallest[0].memory_gb:.1f} GB per "
              f"device, more than the {hw.budget_gb:g} GB available (more devices or --hbm-gb)", file=sys.stderr)
        return 1
    _emit(shown, args, header)
    return 0


def _print_balance(c, plan, seq, hw) -> int:
    from .balance import balance
    if plan.layout.pp == 1:
        raise TeleChat2Error("--balance places layers on pipeline stages: give a layout with pp > 1")
    b = balance(c, plan, seq, hw, hw.budget_gb)
    if b is None:
        print(f"telechat2 plan: refused: no placement of {c.num_layers} layers on {plan.layout.pp} stages fits "
              f"{hw.budget_gb:g} GB per device", file=sys.stderr)
        return 1
    print(format_balance(b))
    return 0


def format_balance(b) -> str:
    lines = [f"pipeline balance: layers per stage {b.counts}; slowest stage {1000 * max(b.stage_time_s):.1f} ms per "
             f"micro-batch (even split: {1000 * b.even_time_s:.1f} ms)",
             "  stage  layers  time ms  memory GB"]
    lines += [f"  {s:>5}  {n:>6}  {1000 * t:>7.1f}  {m:>9.2f}"
              for s, (n, t, m) in enumerate(zip(b.counts, b.stage_time_s, b.stage_memory_gb))]
    lines.append(f"  paste under model.model_config:  offset: {b.offset}")
    return "\n".join(lines)


def cmd_check_config(args) -> int:
    from .check import check_config, format_check
    r = check_config(args.config, args.devices, hbm_gb=_positive("--hbm-gb", args.hbm_gb),
                     peak_tflops=_positive("--peak-tflops", args.peak_tflops), overrides=args.set or [])
    if args.format == "json":
        print(json.dumps(r.to_json(), indent=1))
    else:
        print(format_check(r))
    for p in r.problems:
        print(f"telechat2 check-config: error: {p}", file=sys.stderr)
    return 0 if r.ok else 1


def add_plan_parsers(sub) -> None:
    p = sub.add_parser("plan", help="rank parallel layouts of a model on N devices by estimated memory and speed",
                       description="Enumerate dp/tp/pp/cp/micro-batch/recompute/optimizer-sharding/interleave "
                                   "layouts, estimate memory per device and step time, rank those that fit. "
                                   "The model is described in docs/planner.md.")
    p.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--devices", type=POSITIVE_INT.arg("--devices"), required=True)
    p.add_argument("--seq-length", type=POSITIVE_INT.arg("--seq-length"), default=8192)
    p.add_argument("--hbm-gb", type=POSITIVE.arg("--hbm-gb"), default=ATLAS_800T_A2.hbm_gb, help="device memory (default 64)")
    p.add_argument("--peak-tflops", type=POSITIVE.arg("--peak-tflops"), default=ATLAS_800T_A2.peak_tflops,
                   help="dense bf16 peak per device (default 295, Ascend 910B3)")
    p.add_argument("--global-batch", type=POSITIVE_INT.arg("--global-batch"), help="sequences per optimizer step (default: one per device)")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT.arg("--micro-batch-size"), default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--amp", choices=["O1", "O2"], default="O1", help="AMP level: residual stream fp32 (O1) or bf16")
    p.add_argument("--layout", help="evaluate one layout, e.g. dp=8,tp=1,pp=1,cp=1,mb=1 (optional: vpp=N, "
                                    "recompute=none|selective|full, zero=0|1, sp=0|1, mbs=N, ep=N (MoE: experts "
                                    "over ep dp ranks); options left out are chosen by the planner)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--top", type=NON_NEGATIVE_INT.arg("--top"), default=10, help="layouts to list (0: all)")
    p.add_argument("--all", action="store_true", help="list layouts that do not fit memory too")
    p.add_argument("--balance", action="store_true", help="with --layout (pp > 1): the model_config.offset whose "
                                                          "slowest stage is fastest with every stage fitting")
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("check-config", help="validate a run YAML and its layout for N devices; print the memory "
                                            "estimate per device (no run)")
    c.add_argument("config", help="run YAML (configs/ascend/finetune_7b_o1.yaml, ...)")
    c.add_argument("--devices", type=POSITIVE_INT.arg("--devices"), required=True, help="world size the config will run on")
    c.add_argument("--hbm-gb", type=POSITIVE.arg("--hbm-gb"), help="device memory (default 64; CPU: host memory, default physical)")
    c.add_argument("--peak-tflops", type=POSITIVE.arg("--peak-tflops"), help="dense bf16 peak per device for the step-time estimate")
    c.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a key, as `telechat2 train`")
    c.add_argument("--format", choices=["table", "json"], default="table")
    c.set_defaults(func=cmd_check_config)
