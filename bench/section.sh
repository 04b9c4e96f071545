# shellcheck shell=bash
# replace_section OUTPUT SECTION BEGIN END: the lines of OUTPUT from BEGIN
# to END (markers included) become SECTION's, or SECTION is appended when
# OUTPUT has no such markers; the rest of OUTPUT stays as it is. Each
# bench script owns one marked section of BENCHMARKS.md.
replace_section() {
    local output=$1 section=$2 begin=$3 end=$4
    if [[ -f "$output" ]] && grep -qF "$begin" "$output"; then
        awk -v begin="$begin" -v end="$end" -v file="$section" '
            $0 == begin { while ((getline line < file) > 0) print line; skip = 1; next }
            $0 == end { skip = 0; next }
            !skip { print }
        ' "$output" >"$output.tmp"
    else
        { if [[ -s "$output" ]]; then cat "$output"; echo; fi; cat "$section"; } >"$output.tmp"
    fi
    mv "$output.tmp" "$output"
}
