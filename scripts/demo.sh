#!/usr/bin/env bash
# The quick-start demo. First the package format: it generates a sample
# web-app build, packs v1, patches it into v2, shows what an upgrade moves,
# unpacks v2 and verifies the store. Then a local fleet: `convoy bench`
# starts a coordinator and six convoyd targets on loopback and stages a
# package in swarm, push and pull mode under the same upload caps.
# Everything happens in temporary directories that are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
# The same build the integration tests use, so the two share artifacts.
cargo build --quiet --workspace --bins
convoy="${CARGO_TARGET_DIR:-target}/debug/convoy"

work=$(mktemp -d -t convoy-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export CONVOY_STORE="$work/store"

step() { printf '\n== %s\n' "$*"; }

step "generating a sample web-app build in $work/v1"
app="$work/v1"
mkdir -p "$app/bin" "$app/static/js" "$app/static/css" "$app/templates"
head -c $((6 * 1024 * 1024)) /dev/urandom >"$app/bin/server"
chmod 755 "$app/bin/server"
for i in $(seq 1 40); do
    for j in $(seq 1 400); do
        echo "export function handler_${i}_${j}(req, res) { return res.json({ id: $j, module: $i }); }"
    done >"$app/static/js/module$i.js"
done
for i in $(seq 1 10); do
    seq 1 2000 | sed "s/.*/.c$i-& { margin: &px; padding: 0 }/" >"$app/static/css/theme$i.css"
done
for i in $(seq 1 30); do
    printf '<html><body><h1>page %s</h1>{{ content }}</body></html>\n' "$i" >"$app/templates/page$i.html"
done
ln -s bin/server "$app/run"

step "convoy pack $app --app web --version 1.0"
"$convoy" pack "$app" --app web --version 1.0

step "convoy inspect web@1.0 --summary"
"$convoy" inspect web@1.0 --summary

step "patching one module and the server binary's tail into v2"
cp -a "$app" "$work/v2"
echo "export const patched = true;" >>"$work/v2/static/js/module7.js"
head -c 4096 /dev/urandom >>"$work/v2/bin/server"
"$convoy" pack "$work/v2" --app web --version 1.1

step "convoy diff web@1.0 web@1.1  (what a target holding 1.0 must fetch)"
"$convoy" diff web@1.0 web@1.1

step "convoy unpack web@1.1 $work/deployed"
"$convoy" unpack web@1.1 "$work/deployed"
diff -r "$work/v2" "$work/deployed" && echo "unpacked tree is identical to the source"

step "convoy verify"
"$convoy" verify

step "convoy bench --nodes 6 --size 8MiB --uplink 4MiB  (a local fleet: swarm vs push vs pull)"
"$convoy" bench --nodes 6 --size 8MiB --uplink 4MiB --modes swarm,push,pull
