"""The scale bench's tables and goals, from the records bench.scale collects (one per row, network, latent size and
checkpointing setting; one per ZeRO run): measured where the row ran, its status where it did not."""
from __future__ import annotations

from bench.report import Table
from bench.scale_nets import ROWS, SD_NETS, describe_net, is_sd
from bench.scale_plan import ARITHMETIC, arithmetic_mb


def _find(records: list[dict], net: str, size: int, ckpt: bool, row: str) -> dict | None:
    return next((r for r in records if (r["net"], r["size"], r["ckpt"], r["row"]) == (net, size, ckpt, row)), None)


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def _ratios(records: list[dict]) -> None:
    """x_plain (peak over plain fine-tuning's), step_x (step time over plain's) and arith_x (the arithmetic's ratio) of
    every record, against plain fine-tuning of the same network, latent size and checkpointing."""
    for r in records:
        plain = _find(records, r["net"], r["size"], r["ckpt"], "plain")
        r["arith_x"] = arithmetic_mb(r["row"], r) / arithmetic_mb("plain", r)
        both = _ok(r) and _ok(plain)
        r["x_plain"] = r["peak_mb"] / plain["peak_mb"] if both else None
        r["step_x"] = r["step_s"] / plain["step_s"] if both else None


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / 1024


def _headline(records: list[dict], net: str, size: int, ckpts: list[bool], rows: list[str]) -> list[dict]:
    out = []
    for row in rows:
        line = {"label": ROWS[row][0], "row": row}
        status = []
        for ckpt in ckpts:
            r = _find(records, net, size, ckpt, row)
            if r is None:
                continue
            sfx = "_ckpt" if ckpt else ""
            line.update({"arith_gb": _gb(r["arith_mb"]), "arith_x": r["arith_x"]})
            if _ok(r):
                line.update({"trainable_m": r["trainable_m"], f"peak_gb{sfx}": _gb(r["peak_mb"]),
                             f"x_plain{sfx}": r["x_plain"], f"step_s{sfx}": r["step_s"], f"step_x{sfx}": r["step_x"],
                             f"overhead{sfx}": r.get("overhead"), f"load{sfx}": r["load_1m"]})
                if r.get("partial_calls"):
                    line[f"overhead{sfx}"] = f"{r['overhead']:.2f} *"
            status.append(("with" if ckpt else "without") + f" checkpointing: {r['status']}")
        line["status"] = "ok" if all(s.endswith(": ok") for s in status) else "; ".join(status)
        out.append(line)
    return out


HEAD_COLUMNS = [("label", "method"), ("trainable_m", "trainable (M)"), ("arith_gb", "arithmetic (GB)"),
                ("arith_x", "arithmetic x plain"), ("peak_gb", "peak (GB)"), ("x_plain", "x plain"),
                ("step_s", "step (s)"), ("step_x", "step x plain"), ("overhead", "step / bare passes"),
                ("peak_gb_ckpt", "peak, ckpt (GB)"), ("x_plain_ckpt", "x plain, ckpt"), ("step_s_ckpt", "step, ckpt (s)"),
                ("overhead_ckpt", "step / bare, ckpt"), ("status", "status")]
HEAD_NOTES = [
    "peak: growth of the worker's peak RSS over its baseline (bench.memory's method); the baseline already holds "
    "the libraries and the frozen text encoder with every prompt encoded (frozen and outside the step, as cached "
    "embeddings are); ckpt: gradient checkpointing in every trained diffusers network",
    "arithmetic: bytes per parameter per copy (bench/scale_plan.py), weights and optimizer only, no activations",
    "step / bare passes: the training step over its own network passes replayed alone (bench.speed's method); "
    "* f-distill's discriminator reads features through forwards aborted after the bottleneck, which the replay "
    "runs whole, so its bare time is too high and its ratio a lower bound",
    "random weights, AdamW, no EMA (every row the same); one-step rows: 1 fake-score update per generator update "
    "(configs/sd15/dmd.yaml runs 10: the peak is the same, the step grows by one fake-score update each), "
    "LoRA rank 64 on every conv/linear layer (models.fake_score.DEFAULT_LORA_TARGETS); ESD-x: x_t from a "
    "2-step frozen trajectory bank built before the first step",
]


def tables(rows: list[dict], zero: list[dict], s: dict) -> list[Table]:
    _ratios(rows)
    sd = [n for n in s["nets"] if is_sd(n)]
    top = max(sd, key=lambda n: SD_NETS[n]) if sd else s["nets"][-1]
    size = s["size"] if is_sd(top) else 8
    out = []
    any_row = next((r for r in rows if r["net"] == top), None)
    params = f"{any_row['P'] / 1e6:.1f}M parameters" if any_row else ""
    notes = HEAD_NOTES + (["--quick runs the rows of a network and setting in one process, so later rows reuse memory "
                           "that earlier ones freed: a smoke run, not a measurement"] if s["group"] else [])
    out.append(Table(f"Every method at {'SD 1.5' if top == 'sd15' else top} size on CPU: {describe_net(top, size, s['batch'])}, "
                     f"{params}", HEAD_COLUMNS, _headline(rows, top, size, s["ckpt"], s["rows"]), notes))
    if is_sd(top) and s.get("big_size") and s["big_rows"]:
        big = s["big_size"]
        out.append(Table(f"At 4x{big}x{big} latents ({top}, batch {s['batch']})", HEAD_COLUMNS,
                         _headline(rows, top, big, s["big_ckpt"], s["big_rows"]),
                         ["x plain, arithmetic x plain: against plain fine-tuning at the same latent size and setting",
                          "steps timed without the bare-pass replay (a 4x64x64 step of the full network takes minutes "
                          "on this CPU); warm-up step first, so the peak includes the optimizer's moments"]))
    sweep = []
    for net in s["nets"]:
        for row in s["rows"]:
            for ckpt in s["ckpt"]:
                r = _find(rows, net, size if is_sd(net) else 8, ckpt, row)
                if r is not None:
                    sweep.append({"network": f"{net} ({r['P'] / 1e6:.1f}M)", "label": ROWS[row][0], "ckpt": ckpt,
                                  "lora_share": r["L"] / r["P"], **{k: r.get(k) for k in (
                                      "arith_x", "x_plain", "step_x", "overhead", "peak_mb", "step_s", "status")}})
    ours = [x for x in sweep if x["label"] == ROWS["dmd_lora_bf16"][0] and not x["ckpt"]]
    reading = ", ".join(f"{x['network']}: {x['x_plain']:.2f}x (arithmetic {x['arith_x']:.2f}x, L/P {x['lora_share']:.2f})"
                        for x in ours if x["x_plain"] is not None)
    out.append(Table("How memory and step time grow with the network (x plain: over plain fine-tuning of the same network)",
                     [("network", "network (params)"), ("label", "method"), ("ckpt", "ckpt"),
                      ("arith_x", "arithmetic x plain"), ("x_plain", "peak x plain"), ("step_x", "step x plain"),
                      ("overhead", "step / bare"), ("peak_mb", "peak (MB)"), ("step_s", "step (s)"), ("status", "status")],
                     sweep,
                     [f"{describe_net(n, size if is_sd(n) else 8, s['batch'])}" for n in s["nets"]]
                     + ["the LoRA fake score's ratio (our DMD, no checkpointing): " + (reading or "-"),
                        "arithmetic of our DMD: (18P + 16L) / 16P = 1.125 + L/P; with the rank fixed L grows with the "
                        "width and P with its square, so L/P falls as 1/width and the ratio tends to 1.125x, while "
                        "activations (linear in the width at a fixed latent size) fall as a share too; the three-UNet "
                        "setup stays at 36P / 16P = 2.25x at every size"]))
    zrows = []
    for z in zero:
        zrows.append({"network": f"{z['net']} ({z['P'] / 1e6:.1f}M)", "strategy": f"ZeRO-{z['stage']}, 2 processes",
                      "peak_mb": z.get("peak_mb"), "ranks": " / ".join(f"{p:.0f}" for p in z.get("rank_peaks_mb", [])) or None,
                      "arith_mb": z["arith_mb"], "single_mb": z.get("single_mb"), "x_single": z.get("x_single"),
                      "ckpt_equal": z.get("ckpt_equal"), "ckpt_max_diff": z.get("ckpt_max_diff"),
                      "step_s": z.get("step_s"), "status": z["status"], "stage": z["stage"], "net": z["net"]})
    if zero:
        out.append(Table("One-step DMD with the LoRA fake score under the multi-engine DeepSpeed strategy (CPU/gloo, "
                         "full batch per process)",
                         [("network", "network (params)"), ("strategy", "strategy"), ("peak_mb", "peak per process (MB)"),
                          ("ranks", "rank 0 / rank 1 (MB)"), ("arith_mb", "arithmetic per process (MB)"),
                          ("single_mb", "1 process, no DeepSpeed (MB)"), ("x_single", "x 1 process"),
                          ("ckpt_equal", "converted checkpoint = gathered weights"), ("ckpt_max_diff", "max |diff|"),
                          ("step_s", "step (s)"), ("status", "status")], zrows,
                         ["arithmetic per process (bench/scale_plan.py zero_arithmetic_mb): ZeRO-2 keeps the generator's "
                          "weights whole (4P) and partitions its fp32 master copy, gradients and AdamW moments "
                          "(16P / 2); ZeRO-3 partitions the weights too, and the fake-score engine partitions the bf16 "
                          "base it shares with the teacher",
                          "converted checkpoint: train.runtime.strategy.convert_zero_checkpoint of the run's checkpoint "
                          "against every trainable weight gathered from the engines in memory (models.ema.gathered_weights)"]))
    counts = any_row or {}
    if counts:
        out.append(Table(f"Bytes per parameter per copy ({top}: P = {counts['P'] / 1e6:.1f}M network parameters, "
                         f"L = {counts['L'] / 1e6:.1f}M LoRA, X = {counts['X'] / 1e6:.1f}M cross-attention)",
                         [("label", "method"), ("formula", "bytes"), ("gb", "GB"), ("x", "x plain")],
                         [{"label": ROWS[r][0], "formula": ARITHMETIC[r][1], "gb": arithmetic_mb(r, counts) / 1024,
                           "x": arithmetic_mb(r, counts) / arithmetic_mb("plain", counts)} for r in s["rows"]],
                         ["trained fp32 copy with AdamW: weights 4 + gradient 4 + two moments 8 = 16 bytes; frozen "
                          "copy: 4 (fp32) or 2 (bf16)"]))
    return out


def goals(rows: list[dict], zero: list[dict], s: dict) -> list[dict]:
    sd = [n for n in s["nets"] if is_sd(n)]
    top = max(sd, key=lambda n: SD_NETS[n]) if sd else s["nets"][-1]
    size = s["size"] if is_sd(top) else 8
    name = "SD 1.5" if top == "sd15" else top

    def at(row: str, ckpt: bool):
        return _find(rows, top, size, ckpt, row)

    def ratio(r, key="x_plain") -> str:
        if r is None:
            return "-"
        if _ok(r) and r.get(key) is not None:
            return f"{r[key]:.2f}x"
        return f"{r['status']}; arithmetic {r['arith_x']:.2f}x"

    ours, copy = at("dmd_lora_bf16", False), at("dmd_copy", False)
    ours_ckpt = at("dmd_lora_bf16", True)
    timed = [r for r in rows if r["net"] == top and r["size"] == size and _ok(r) and r.get("overhead") is not None
             and not r.get("partial_calls")]
    worst = max(timed, key=lambda r: r["overhead"]) if timed else None
    measured_z = [z for z in zero if z["stage"] == 3 and z.get("x_single") is not None]
    z3 = max(measured_z, key=lambda z: z["P"]) if measured_z else None
    out = [{"goal": f"one-step DMD, LoRA fake score on a bf16 frozen base, vs plain fine-tuning at {name} size (peak)",
            "target": "<= 1.3x",
            "measured": f"{ratio(ours)} (with checkpointing {ratio(ours_ckpt)}; arithmetic "
                        f"{ours['arith_x']:.2f}x)" if ours else "-",
            "met": bool(_ok(ours) and ours["x_plain"] is not None and ours["x_plain"] <= 1.3)},
           {"goal": f"three full UNets (full-copy fake score, fp32 teacher: DMD2) vs plain fine-tuning at {name} size",
            "target": "reference", "measured": ratio(copy), "met": None},
           {"goal": f"training-step overhead over bare network passes at {name} size (our DMD; worst row)",
            "target": "<= 1.10x",
            "measured": (f"{ratio(ours, 'overhead')} (our DMD); worst {worst['overhead']:.2f}x ({worst['row']}); "
                         + ", ".join(f"{r['row']}{' ckpt' if r['ckpt'] else ''} {r['overhead']:.2f}x" for r in timed))
            if worst else "-",
            "met": bool(worst is not None and worst["overhead"] <= 1.10)},
           {"goal": "ZeRO-3 peak per process vs one process (DMD, LoRA fake score, 2 processes; largest network run)",
            "target": "<= 0.6x",
            "measured": (f"{z3['x_single']:.2f}x on {z3['net']}; " + "; ".join(
                f"{z['net']} ZeRO-{z['stage']}: " + (f"{z['x_single']:.2f}x" if z.get("x_single") is not None
                                                     else z["status"]) for z in zero)) if zero else "-",
            "met": bool(z3 is not None and z3["x_single"] <= 0.6)}]
    return out
