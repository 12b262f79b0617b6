#!/bin/bash
# Stage 1: OpenVid-1M CSV + mp4s (extracted folder and/or OpenVid_partN.zip archives, split
# _partaa/_partab archives read in place) -> raw WebDataset shards. One machine, many CPU workers.
set -euo pipefail
exec vmla-data raw data_prep/openvid.yaml "$@"
