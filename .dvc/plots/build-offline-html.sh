#!/bin/sh
# Rebuild offline.html: the page `dvc plots show/diff` fills (plots.html_template in .dvc/config),
# with vega, vega-lite and vega-embed inlined so the plots render with no network. DVC's own page
# loads vega@5, vega-lite@5 and vega-embed@6 from a CDN; these are the same major versions.
# Usage: sh .dvc/plots/build-offline-html.sh [vega-version vega-lite-version vega-embed-version]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vega=${1:-5.33.1} lite=${2:-5.23.0} embed=${3:-6.29.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "vega@$vega" "vega-lite@$lite" "vega-embed@$embed" >/dev/null)
for name in vega vega-lite vega-embed; do
    mkdir "$work/$name" && tar xzf "$work/$name"-[0-9]*.tgz -C "$work/$name"
done
inline() {  # a minified build as an inline script; "</script" must not occur inside it
    if grep -q '</script' "$1"; then echo "$1 contains </script" >&2; exit 1; fi
    printf '<script type="text/javascript">\n'; grep -v '^//# sourceMappingURL=' "$1"; printf '\n</script>\n'
}
{
cat <<EOF
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (cifarlab, offline)</title>
    <!-- vega $vega, vega-lite $lite, vega-embed $embed from npm (BSD-3-Clause, https://vega.github.io),
         inlined by .dvc/plots/build-offline-html.sh. This page has no placeholder for DVC's
         scripts on purpose: DVC would put its CDN script tags there. -->
EOF
inline "$work/vega/package/build/vega.min.js"
inline "$work/vega-lite/package/build/vega-lite.min.js"
inline "$work/vega-embed/package/build/vega-embed.min.js"
cat <<'EOF'
    <style>
        /* Interactive plots side by side; each image plot a full-width row whose revisions share
           the width (DVC's own page lets three wide PNGs run off the right edge). */
        body { font-family: sans-serif; margin: 16px; }
        body > div:not(:has(img)) { display: inline-block; vertical-align: top; margin: 0 24px 28px 0; }
        body > div:has(img) { display: flex; flex-wrap: wrap; align-items: flex-start; margin-bottom: 28px; }
        body > div:has(img) > p { flex-basis: 100%; font-weight: bold; }
        body > div:has(img) > div { flex: 1 1 0; min-width: 320px; }
        body > div:has(img) img { max-width: 100%; height: auto; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
EOF
} > "$here/offline.html"
echo "wrote $here/offline.html ($(wc -c < "$here/offline.html") bytes)"
