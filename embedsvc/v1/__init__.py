"""Generated embedsvc.v1 API code: do not edit; run scripts/gen_protos.sh."""
