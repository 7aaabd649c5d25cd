#!/usr/bin/env bash
# onnxruntime's C/C++ API headers for building the custom-op library (the onnxruntime wheels ship none).
# Debian trixie's libonnxruntime-dev 1.21.0 (C API version 21, usable with the 1.31 runtime), fetched with a private
# apt configuration under DEST, so nothing in the system's apt setup changes.
# usage: fetch_headers.sh DEST   -> DEST/include/onnxruntime/onnxruntime_cxx_api.h ...
set -euo pipefail
dest=$(realpath -m "${1:?usage: fetch_headers.sh DEST}")
if [ -f "$dest/include/onnxruntime/onnxruntime_cxx_api.h" ]; then exit 0; fi
apt_dir="$dest/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dest/include"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
opts=(-q -o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=/nonexistent
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update > /dev/null
(cd "$apt_dir" && apt-get "${opts[@]}" download libonnxruntime-dev=1.21.0+dfsg-1)
dpkg-deb -x "$apt_dir"/libonnxruntime-dev_*.deb "$apt_dir/root"
cp -r "$apt_dir/root/usr/include/onnxruntime" "$dest/include/"
rm -rf "$apt_dir"
