# Sourced by world_teacher.sh and world_student.sh (W = the world folder).

# stride: the key=value every stage after the codec takes its geometry from, the codec's own strides
# (video.vae_stride=[time, space, space], from $W/models/vae/config.json)
stride() {
  python3 -c "import json, sys; c = json.load(open(sys.argv[1])); t, s = c['scale_factor_temporal'], c['scale_factor_spatial']; print(f'video.vae_stride=[{t},{s},{s}]')" "$W/models/vae/config.json"
}
