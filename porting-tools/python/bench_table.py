"""Turn `lmspec bench --against mlx-lm --json` outputs into the Markdown
table and the SVG chart of docs/benchmarks.md.

Usage: bench_table.py --svg OUT.svg LABEL=FILE.json [LABEL=FILE.json ...]
Prints the Markdown table on stdout.

       bench_table.py --summary FILE.json [...]
Prints one block per report: medians, their ratio, the median ratio of
neighbouring (interleaved) repeats, primitives per decode step and whether
the greedy tokens agree.
"""
import argparse
import json


def med(side, key):
    return side[key]["median"]


def spread(side, key):
    return f"{side[key]['min']:.1f}–{side[key]['max']:.1f}"


def paired(side):
    p = side.get("paired_ratio", {}).get("decode_tps")
    return f"{p['median']:.2f}x ({p['min']:.2f}–{p['max']:.2f})" if p else "–"


def summary(path):
    d = json.load(open(path))
    a, b = d["lmspec"], d["mlx_lm"]
    print(f"{path}: {a['model']} on {a['device']}, {a['repeat']} interleaved repeats")
    for key in ("prefill_tps", "decode_tps"):
        paired = a.get("paired_ratio", {}).get(key)
        pair = (f"; neighbouring repeats {paired['median']:.3f}x "
                f"({paired['min']:.2f}x-{paired['max']:.2f}x)" if paired else "")
        print(f"  {key}: lmspec {med(a, key):.1f} ({spread(a, key)}), mlx-lm {med(b, key):.1f} "
              f"({spread(b, key)}), ratio {med(a, key) / med(b, key):.3f}x{pair}")
    ga, gb = a.get("decode_graph", {}), b.get("decode_graph", {})
    print(f"  primitives per decode step: lmspec {ga.get('total')}, mlx-lm {gb.get('total')}")
    for name, side in (("lmspec", a), ("mlx-lm", b)):
        us = side.get("decode_step_us")
        if us:
            print(f"  {name} host us per decode step: build {us['build']:.1f}, "
                  f"launch {us['launch']:.1f}, wait {us['wait']:.1f}")
    print(f"  greedy tokens equal: {a['tokens'] == b['tokens']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--svg")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    if args.summary:
        for path in args.runs:
            summary(path)
        return
    rows = []
    for item in args.runs:
        label, path = item.split("=", 1)
        d = json.load(open(path))
        rows.append((label, d["lmspec"], d["mlx_lm"]))
    print("| case | weights | prefill tok/s lmspec (range) | mlx-lm (range) | ratio | decode tok/s lmspec (range) | mlx-lm (range) | ratio | paired decode ratio (range) | primitives/step lmspec / mlx-lm | TTFT s lmspec / mlx-lm | peak MB lmspec / mlx-lm | greedy tokens equal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, a, b in rows:
        print(
            f"| {label} | {a['weights'].replace('quantized', 'as stored')} / {b['weights'].replace('quantized', 'as stored')} "
            f"| {med(a, 'prefill_tps'):.1f} ({spread(a, 'prefill_tps')}) | {med(b, 'prefill_tps'):.1f} ({spread(b, 'prefill_tps')}) "
            f"| {med(a, 'prefill_tps') / med(b, 'prefill_tps'):.2f}x "
            f"| {med(a, 'decode_tps'):.1f} ({spread(a, 'decode_tps')}) | {med(b, 'decode_tps'):.1f} ({spread(b, 'decode_tps')}) "
            f"| {med(a, 'decode_tps') / med(b, 'decode_tps'):.2f}x "
            f"| {paired(a)} | {a.get('decode_graph', {}).get('total', '?')} / {b.get('decode_graph', {}).get('total', '?')} "
            f"| {med(a, 'ttft_s'):.3f} / {med(b, 'ttft_s'):.3f} | {a['peak_memory_mb']:.0f} / {b['peak_memory_mb']:.0f} "
            f"| {'yes' if a['tokens'] == b['tokens'] else 'no'} |"
        )
    if args.svg:
        width, bar, gap, left = 640, 14, 10, 150
        height = len(rows) * (2 * bar + gap) + 40
        top = max(max(med(a, "decode_tps"), med(b, "decode_tps")) for _, a, b in rows)
        scale = (width - left - 60) / top
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
               f'<text x="{left}" y="14">decode tokens/s (median): lmspec (blue) vs mlx-lm (grey)</text>']
        y = 26
        for label, a, b in rows:
            out.append(f'<text x="{left - 6}" y="{y + bar + 4}" text-anchor="end">{label}</text>')
            for side, colour in ((a, "#1f77b4"), (b, "#999999")):
                v = med(side, "decode_tps")
                out.append(f'<rect x="{left}" y="{y}" width="{v * scale:.1f}" height="{bar}" fill="{colour}"/>')
                out.append(f'<text x="{left + v * scale + 4:.1f}" y="{y + bar - 3}">{v:.1f}</text>')
                y += bar
            y += gap
        out.append("</svg>")
        open(args.svg, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
