# Sourced by the GPU scripts: `step NAME LIMIT CMD...` runs CMD with its output in $LOGS/NAME.log, bounded by
# LIMIT seconds and by what is left of TOTAL (the script's budget; a step with under 30 s left is skipped), and
# appends one line (name, exit status, seconds, the log's last pass/fail line) to $OUT/summary.txt.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( TOTAL - SECONDS - 15 ))
  (( left < 30 )) && { echo "SKIP $name (${left}s of the budget left)" | tee -a "$OUT/summary.txt"; return 0; }
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-24s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( SECONDS - t0 ))" \
    "$(grep -E 'passed|failed|FAILED|Error' "$LOGS/$name.log" | tail -1 | cut -c1-200)" | tee -a "$OUT/summary.txt"
}
