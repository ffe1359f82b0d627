#!/usr/bin/env bash
# Build what the PD stages carry to the device (run here, from the project root; needs PyPI and apt):
#   scratch/mooncake-min.tar.xz  the non-CUDA Mooncake wheel for Python 3.12, trimmed to the transfer engine
#                                (mooncake/*.py, engine.so and the libraries it links: ~11 MB instead of 46)
#   scratch/debs/                the Debian packages of the system libraries engine.so links (libibverbs, libnuma,
#                                libcurl and theirs); gpu_suite.sh's pd_setup uses only those the image lacks
# The CUDA build (mooncake-transfer-engine) needs libcudart 12, which the CUDA 13 image does not have.
set -euo pipefail
VERSION=${MOONCAKE_VERSION:-0.3.13.post1}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$W" "mooncake-transfer-engine-non-cuda==$VERSION"
(cd "$W" && unzip -q ./*.whl)
# the .libs copies of etcd_wrapper and asio duplicate mooncake/ (engine.so loads those): left out
libs=$(cd "$W" && ls mooncake_transfer_engine_non_cuda.libs/* | grep -v "etcd_wrapper\|asio")
mkdir -p scratch
(cd "$W" && tar -cJf mooncake-min.tar.xz mooncake/*.py mooncake/engine.so mooncake/libasio.so \
  mooncake/libetcd_wrapper.so $libs)
mv "$W/mooncake-min.tar.xz" scratch/
rm -rf scratch/debs && mkdir -p scratch/debs
# engine.so's NEEDED system libraries and their dependencies, without the base system's own packages
(cd scratch/debs && apt-get download libibverbs1 libnl-3-200 libnl-route-3-200 libnuma1 libcurl4 libbrotli1 \
  libcom-err2 libffi8 libgmp10 libgnutls30 libgssapi-krb5-2 libhogweed6 libidn2-0 libk5crypto3 libkeyutils1 \
  libkrb5-3 libkrb5support0 libldap-2.5-0 libnettle8 libnghttp2-14 libp11-kit0 libpsl5 librtmp1 libsasl2-2 \
  libsasl2-modules-db libssh2-1 libssl3 libtasn1-6 libunistring2 2>&1 | grep -v "^W:" || true)
du -sh scratch/mooncake-min.tar.xz scratch/debs
