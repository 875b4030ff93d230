#!/usr/bin/env bash
# Rewrite the committed results of the mnist-mini suite and its config arms from the results
# database: Table 1 and Table 8, the arms and their A/B, the exports and model cards, the HTML
# report and its screenshot. Reads only the database (default runs/bench/ctbench.sqlite), so it
# runs in seconds; on a new checkout, first import what is committed:
#   ctbench bench import results/mnist-mini/bench-export.json
#   ctbench bench import results/mnist-mini/arms-export.json
# Usage: benchmarks/mnist_mini_results.sh [DB]
set -euo pipefail
cd "$(dirname "$0")/.."
db=${1:-runs/bench/ctbench.sqlite}
ctbench=${CTBENCH:-.venv/bin/ctbench}
arms=benchmarks/suites/mnist-mini-arms.yaml
out=results/mnist-mini

"$ctbench" bench table mnist-mini --db "$db" --out "$out/table.md"
"$ctbench" bench times mnist-mini --db "$db" --out "$out/times.md"
"$ctbench" bench table "$arms" --db "$db" --out "$out/arms-table.md"
"$ctbench" bench times "$arms" --db "$db" --out "$out/arms-times.md"
"$ctbench" bench ab "$arms" --baseline mnist-mini --db "$db" --out "$out/arms-ab.md"
"$ctbench" bench export --db "$db" --suite mnist-mini --json "$out/bench-export.json" --no-verdicts \
    --cards "$out/model_info"
"$ctbench" bench export --db "$db" --suite mnist-mini-arms --json "$out/arms-export.json" --no-verdicts \
    --cards "$out/model_info"

report="$(dirname "$db")/report-mnist-mini.html"
"$ctbench" bench report mnist-mini --db "$db" --out "$report" --figures results/analysis
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -n "$browser" ]; then
    "$browser" --headless --no-sandbox --disable-gpu --window-size=1400,2000 \
        --screenshot="$PWD/results/bench_report_mnist-mini.png" "file://$(realpath "$report")" 2>/dev/null
else
    echo "no chromium on PATH: the screenshot is not refreshed (Debian: apt-get install chromium)" >&2
fi
