"""GPU check of the calculator: a random-weight model built from a real config, loaded in each format on
CUDA; weights measured from the objects, allocator peak of a prefill, NVML process memory, vs predictions.

Run on a CUDA machine (device tool): ``python bench/gpu_calculator_check.py [PRESET] [--context N]``.
Writes JSON lines to $OUT/gpu_calculator_check.jsonl (or ./artifacts/) and prints a table.
Memory does not depend on weight values, so random weights give the real numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from engine.backends.measure import weight_bytes  # noqa: E402
from engine.formats import parse_method  # noqa: E402
from engine.memory import estimate  # noqa: E402
from engine.sources import PRESETS_DIR, _find_preset, resolve  # noqa: E402
from engine.specs import RuntimeSpec  # noqa: E402

MiB = 2**20


def nvml_process_bytes() -> int | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory)
    except Exception as e:  # noqa: BLE001 - a measurement that is absent is reported as None
        print("nvml:", e)
    return None


def load(fmt: str, ckpt: str):
    q = parse_method(fmt)
    t0 = time.perf_counter()
    if q.method in ("bf16", "fp16", "fp32"):
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[q.method]
        m = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt, device_map="cuda")
    elif q.method in ("bnb4", "int8"):
        kw = (dict(load_in_8bit=True) if q.method == "int8" else
              dict(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                   bnb_4bit_compute_dtype=torch.bfloat16))
        m = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda",
                                                    quantization_config=tf.BitsAndBytesConfig(**kw))
    elif q.method == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel
        m = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
        AutoHQQHFModel.quantize_model(m, quant_config=BaseQuantizeConfig(nbits=q.bits, group_size=q.group_size),
                                      compute_dtype=torch.bfloat16, device="cuda")
    else:
        raise SystemExit(f"format {fmt} is not run here")
    torch.cuda.synchronize()
    return q, m, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", nargs="?", default="meta-llama/Llama-3.1-8B-Instruct")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--formats", default="bf16,nf4,nf4-dq,fp4,int8,hqq4")
    a = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or ROOT / "artifacts")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "gpu_calculator_check.jsonl"
    spec = resolve(a.preset)
    p = _find_preset(a.preset)
    cfg = json.loads((PRESETS_DIR / p["file"]).read_text())
    mt = cfg.pop("model_type")
    config = tf.AutoConfig.for_model(mt, **cfg)
    ckpt = f"/tmp/qs-ckpt-{p['file'].removesuffix('.json')}"
    torch.zeros(1, device="cuda")
    ctx_bytes = (nvml_process_bytes() or 0) - torch.cuda.memory_reserved()
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} transformers {tf.__version__}; "
          f"CUDA context (NVML process - reserved): {ctx_bytes / MiB:.0f} MiB", flush=True)
    if not Path(ckpt, "config.json").exists():
        t0 = time.perf_counter()
        with torch.device("cuda"):
            m = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        m.save_pretrained(ckpt)
        del m
        gc.collect()
        torch.cuda.empty_cache()
        print(f"random checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    rt = RuntimeSpec(context=a.context, batch=1, device="cuda")
    for fmt in a.formats.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        q, m, load_s = load(fmt, ckpt)
        w_meas = weight_bytes(m)
        alloc = torch.cuda.memory_allocated() - base
        est = estimate(spec, q, rt)
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, spec.vocab_size, (1, a.context), device="cuda")
        with torch.no_grad():
            # generate() computes the last position's logits only, like the estimate assumes.
            t0 = time.perf_counter()
            o = m.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False)
            torch.cuda.synchronize()
            gen_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        nv = nvml_process_bytes()
        row = dict(preset=a.preset, format=q.name, context=a.context, load_s=round(load_s, 1),
                   weights_measured=w_meas, weights_predicted=est.weights_bytes,
                   weights_err=(est.weights_bytes - w_meas) / w_meas, allocated_after_load=alloc,
                   peak_allocated=peak, peak_predicted_no_overhead=est.total_bytes - est.overhead_bytes,
                   peak_err=(est.total_bytes - est.overhead_bytes - peak) / peak, nvml_process=nv,
                   predicted_total=est.total_bytes, gen_s_33_tokens=round(gen_s, 2), tokens_out=o.shape[1] - a.context)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{q.name:8} load {load_s:6.1f}s weights meas {w_meas / MiB:9.1f} pred {est.weights_bytes / MiB:9.1f} MiB "
              f"({row['weights_err']:+.3%}) | alloc {alloc / MiB:9.1f} | peak {peak / MiB:9.1f} pred "
              f"{row['peak_predicted_no_overhead'] / MiB:9.1f} ({row['peak_err']:+.1%}) | nvml "
              f"{(nv or 0) / MiB:9.1f} pred {est.total_bytes / MiB:9.1f}", flush=True)
        del m, o, ids
        gc.collect()


if __name__ == "__main__":
    main()
