"""Which timm families int8 PyTorch quantizes, and how: every family of ``tests/family_configs.py`` (one tiny
configuration each, random weights) through ``quantize_torch``'s ``static`` and ``dynamic`` recipes.

Per family: the recipe order ``torch_int8_export`` would try (:func:`torch_recipes`), and per recipe either
``ok`` with the int8 model's mean absolute logit error relative to the fp32 logits' standard deviation, or
``refused`` with the reason. No family may end otherwise (an exception that is not a refusal is a bug: the script
exits 1). Random tiny models say nothing about accuracy (the export's gate measures that on the user's val); this
measures coverage. Writes ``<out>/results.json``.

    python benchmarks/int8_families.py --out benchmarks/results/int8_families
    python benchmarks/int8_families.py --out /tmp/int8 --families convmixer resnet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def sweep(key: str) -> dict[str, Any]:
    """One family: its recipe order and each recipe's outcome."""
    import torch

    from tests.family_configs import CONFIGS, build
    from vision_transfer.errors import ExportError
    from vision_transfer.export.quantize_torch import TORCH_RECIPES, quantize_torch, torch_recipes

    size = CONFIGS[key][2]
    model = build(key).eval()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(images)
    row: dict[str, Any] = {"family": key, "model": CONFIGS[key][0], "order": list(torch_recipes(model))}
    for recipe in TORCH_RECIPES:
        start = time.perf_counter()
        try:
            int8 = quantize_torch(model, [images], (3, size, size), recipe)
            with torch.inference_mode():
                error = (int8(images).float() - reference).abs().mean() / (reference.std() + 1e-12)
            row[recipe] = {"outcome": "ok", "relative_error": round(float(error), 4)}
        except ExportError as e:
            row[recipe] = {"outcome": "refused", "reason": str(e)}
        row[recipe]["s"] = round(time.perf_counter() - start, 2)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_families"))
    parser.add_argument("--families", nargs="+", default=None, help="keys of tests/family_configs.py (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import platform

    import torch

    from tests.family_configs import CONFIGS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contended ones
    rows, crashed = [], []
    try:
        for key in args.families or sorted(CONFIGS):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.ao's deprecation notices, timm's size notes
                    rows.append(sweep(key))
            except Exception as e:  # anything but a refusal
                crashed.append(key)
                rows.append({"family": key, "crash": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    (out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    counts = {
        name: sum(1 for r in rows if test(r))
        for name, test in (
            ("static ok", lambda r: r.get("static", {}).get("outcome") == "ok"),
            ("dynamic ok", lambda r: r.get("dynamic", {}).get("outcome") == "ok"),
            ("first recipe ok", lambda r: "order" in r and r[r["order"][0]]["outcome"] == "ok"),
            ("no recipe ok", lambda r: "order" in r and all(r[k]["outcome"] != "ok" for k in r["order"])),
        )
    }  # fmt: skip
    print(f"\n{len(rows)} families ({machine}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for r in rows:
        if "order" in r and all(r[k]["outcome"] != "ok" for k in r["order"]):
            print(f"  {r['family']}: refused: " + "; ".join(r[k]["reason"] for k in r["order"]))
    if crashed:
        print(f"crashed (a bug: neither quantized nor refused): {', '.join(crashed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
