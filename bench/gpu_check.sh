#!/usr/bin/env bash
# One-command GPU check (issues 11 "Real scale", 15 "The first GPU run survives", 19 "ViT backbones"): on one H100/H200 it
# writes gpu_report.md with, per step, OK or FAILED (exit code or timeout), its seconds and the tail of its output:
#   1. build csrc/ for CUDA (its own step: the first nvcc build takes ~2 min; nvcc vs torch CUDA version printed)
#   2. the CUDA op tests (tests/test_ops.py and tests/test_real_scale.py, CUDA cases)
#   3. bench/bench_ops.py --device cuda
#   4. ms_deform_attn forward+backward, fused vs reference, batch 8, 12096 tokens (a 768 crop's 3 levels)
#   5. bench/real_scale.py --device cuda (fp32 and the fast options; plots on, last.pt saved, 2 images evaluated at
#      1024x2048 at the end of each phase, then a --resume of one more joint iteration)
#   6. host synchronizations of one joint iteration at batch 8 (torch.cuda.set_sync_debug_mode; tests/devicestrict.py)
#   7. torchrun, 2 ranks on the one GPU (gloo: NCCL refuses two ranks on one device), both phases with plots,
#      evaluation and saves
#   8. one SD2 UNet denoising step in fp16 (diffusers UNet2DConditionModel, random init, SD 2 768-v architecture)
#   9. SAM vit_t and vit_h (random init) refinement of one 768x768 image through refine.pseudo_label_target
#  10. the ViT backbones of backbones.py beside ConvNeXt-L, batch 8 x 768 (bench/bench_backbones.py): one row per
#      backbone x tuning (frozen forward; Rein / LoRA forward + backward), seconds and peak memory
# Every step runs under `timeout` (GPU limits sum to 930 s); a failure is recorded and the script goes on. Imports are
# checked first. A lent GPU session allows 10 minutes per command: run it in two parts, e.g.
#   bash bench/gpu_check.sh --steps "1 2 3 4 5" --report $OUT/gpu_report_a.md     (limits sum to 620 s incl. imports)
#   bash bench/gpu_check.sh --steps "6 7 8 9 10" --report $OUT/gpu_report_b.md    (limits 340 s; the build is cached
#                                                                                   when the machine is the same)
#
# Usage:
#   bash bench/gpu_check.sh                        # on the GPU machine; PYTHON=/path/to/python to override
#   bash bench/gpu_check.sh --report $OUT/gpu_report.md
#   bash bench/gpu_check.sh --dry-run              # every step at tiny size on the CPU, same report (several minutes
#                                                  # of CPU time: longer on a loaded machine)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=0
STEPS=""
REPORT=gpu_report.md
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/clouds_gpu_check}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --report) REPORT=$2; shift ;;
    --work) WORK=$2; shift ;;
    --steps) STEPS=" $2 "; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --report FILE, --work DIR, --steps "N ...")" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$WORK" "$(dirname "$REPORT")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda  # DEVELOPERS.md: csrc/ build
if [ $DRY = 1 ]; then DEVICE=cpu; MODE="dry run (tiny sizes, CPU)"; else DEVICE=cuda; MODE="full (CUDA)"; fi
FAILED=0
# lim GPU_S DRY_S: a step's time limit; the GPU limits sum to 930 s (two parts under 10 minutes each); the dry run on a shared CPU gets more
lim() { if [ $DRY = 1 ]; then echo "$2"; else echo "$1"; fi; }

{
  echo "# GPU check ($MODE)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); PYTHON=$PYTHON"
  echo
  echo '```'
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) \
    || echo "nvidia-smi: not found"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo '```'
} > "$REPORT"

# step NAME LIMIT_S COMMAND...: run it under timeout, append its status, seconds and output tail to the report
step() {
  local name=$1 limit=$2 log rc start status
  shift 2
  local num=${name%%.*}
  if [ -n "$STEPS" ] && [ "$num" != 0 ] && [[ "$STEPS" != *" $num "* ]]; then return 0; fi  # --steps: not this one
  log="$WORK/$(echo "$name" | tr -c 'A-Za-z0-9\n' '_').log"
  echo "[gpu_check] $name (limit ${limit} s)"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc = 0 ]; then status=OK
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status="FAILED (timeout after ${limit} s)"; FAILED=$((FAILED + 1))
  else status="FAILED (exit $rc)"; FAILED=$((FAILED + 1)); fi
  echo "[gpu_check] $name: $status in $secs s"
  {
    echo
    echo "## $name"
    echo
    echo "status: $status; $secs s (limit $limit s)"
    echo
    echo '```'
    grep -v -e "UserWarning: Overwriting tiny_vit" -e "return register_model" "$log" | tail -n 40
    echo '```'
  } >> "$REPORT"
}

# ---- 0. imports ----
step "0. imports" "$(lim 30 300)" "$PYTHON" - "$DEVICE" <<'EOF'
import importlib, sys
device = sys.argv[1]
need = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "open_clip": "open_clip_torch",
        "diffusers": "diffusers", "segment_anything": "segment-anything", "mobile_sam": "mobilesam-mirror",
        "pytest": "pytest", "tqdm": "tqdm", "ninja": "ninja"}
missing = []
for module, package in need.items():
    try:
        m = importlib.import_module(module)
        print(f"{module:18s} {getattr(m, '__version__', 'ok')}")
    except ImportError as e:
        missing.append(package)
        print(f"{module:18s} MISSING ({e})")
import torch
print(f"torch CUDA build {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch: the CUDA steps will fail (use --dry-run on a CPU machine)")
    print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB")
if missing:
    sys.exit(f"missing packages: pip install {' '.join(missing)}")
EOF

# ---- 1. build csrc/ ----
step "1. build csrc/" "$(lim 250 300)" "$PYTHON" - "$DRY" <<'EOF'
import sys, time
import torch
import ops

dry = sys.argv[1] == "1"
if not dry:
    print(f"torch {torch.__version__} CUDA {torch.version.cuda}; CUDA_HOME {ops.cuda_home()}")
    print("nvcc:", ops.nvcc_problem() or "found, same CUDA major version as torch")
t0 = time.time()
path = ops.load_extension(with_cuda=not dry, verbose=True)
print(f"built and loaded {path} in {time.time() - t0:.0f} s")
print("ops:", ops.resolved_impls())
EOF

# ---- 2. CUDA op tests ----
# (the dry run collects them and skips them on the CPU, "needs a CUDA GPU", which is the check)
step "2. CUDA op tests" "$(lim 60 300)" "$PYTHON" -m pytest -q -rs tests/test_ops.py tests/test_real_scale.py \
  -k "cuda and not compile"

# ---- 3. bench_ops ----
if [ $DRY = 1 ]; then
  step "3. bench_ops" 300 "$PYTHON" bench/bench_ops.py --device cpu --height 64 --width 128 --crop 64 --min_area 50 \
    --queries 10 --reps 1 --no-memory
else
  step "3. bench_ops" 40 "$PYTHON" bench/bench_ops.py --device cuda --reps 5 --no-memory
fi

# ---- 4. ms_deform_attn forward + backward ----
step "4. ms_deform_attn fwd+bwd" "$(lim 40 120)" "$PYTHON" - "$DRY" <<'EOF'
import sys, time
import torch
import ops

dry = sys.argv[1] == "1"
device = "cpu" if dry else "cuda"
B, shapes = (1, [(3, 3), (6, 6), (12, 12)]) if dry else (8, [(24, 24), (48, 48), (96, 96)])  # 768 crop: 12096
S, nH, Dh, nP = sum(h * w for h, w in shapes), 8, 32, 4
g = torch.Generator(device=device).manual_seed(0)
value = torch.randn(B, S, nH, Dh, device=device, generator=g, requires_grad=True)
loc = torch.rand(B, S, nH, len(shapes), nP, 2, device=device, generator=g, requires_grad=True)
attn = torch.rand(B, S, nH, len(shapes), nP, device=device, generator=g).softmax(-1).requires_grad_()
grad = torch.randn(B, S, nH * Dh, device=device, generator=g)
results = {}
for impl in ("ref", "ext"):
    times = []
    for _ in range(4):
        value.grad = loc.grad = attn.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = ops.ms_deform_attn(value, shapes, loc, attn, impl=impl)
        out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    results[impl] = (sorted(times[1:])[1], mem, out.detach(), value.grad.clone(), loc.grad.clone())
ref, ext = results["ref"], results["ext"]
diff = [float((a - b).abs().max()) for a, b in zip(ref[2:], ext[2:])]
print(f"B={B}, {S} tokens (queries = tokens), {nH} heads x {Dh}, {len(shapes)} levels, {nP} points, {device}")
print(f"| path | forward+backward ms | peak GiB |\n|---|---:|---:|\n| reference (grid_sample) | {1000 * ref[0]:.1f} | "
      f"{ref[1]:.2f} |\n| fused | {1000 * ext[0]:.1f} | {ext[1]:.2f} |")
print(f"speed-up {ref[0] / ext[0]:.2f}x; max |difference| output {diff[0]:.2e}, value grad {diff[1]:.2e}, "
      f"location grad {diff[2]:.2e}")
assert all(d < 1e-3 for d in diff[:2]), diff
EOF

# ---- 5. real_scale ----
if [ $DRY = 1 ]; then
  step "5. real_scale" 600 "$PYTHON" bench/real_scale.py --tiny --device cpu --iters 1 --p-gen 1.0 \
    --work "$WORK/real_scale"
else
  step "5. real_scale" 200 "$PYTHON" bench/real_scale.py --device cuda --iters 2 --work "$WORK/real_scale"
fi
SIZE=$([ $DRY = 1 ] && echo tiny || echo real)

# ---- 6. host synchronizations of a joint iteration ----
if [ $DRY = 1 ]; then SYNC_DEVICE=emulated; SYNC_BATCH=2; else SYNC_DEVICE=cuda; SYNC_BATCH=8; fi
step "6. host syncs per joint iteration" "$(lim 60 300)" "$PYTHON" tests/devicestrict.py --device "$SYNC_DEVICE" \
  --batch-size "$SYNC_BATCH" --data-root "$WORK/real_scale/$SIZE/datasets" --synthetic "$WORK/real_scale/$SIZE/generated"

# ---- 7. torchrun, 2 ranks on one GPU ----
TORCHRUN_DEVICE=$([ $DRY = 1 ] && echo cpu || echo cuda:0)
step "7. torchrun 2 ranks" "$(lim 80 300)" env CLOUDS_DIST_BACKEND=gloo "$PYTHON" -m torch.distributed.run \
  --standalone --nproc_per_node 2 train.py --preset tiny --train-backbone --device "$TORCHRUN_DEVICE" \
  --data-root "$WORK/real_scale/$SIZE/datasets" --synthetic "$WORK/real_scale/$SIZE/generated" \
  --out "$WORK/torchrun" --overwrite --crop-size 64 --batch-size 4 --workers 0 --iters-warmup 2 --iters-joint 2 \
  --eval-every 2 --eval-sets cityscapes --eval-max 2 --test-short-side 64 --save-every 1 --sam toy \
  --sam-min-area 20 --p-gen 0.5 --no-progress

# ---- 8. SD2 UNet step ----
step "8. SD2 UNet step (fp16)" "$(lim 40 300)" "$PYTHON" - "$DRY" <<'EOF'
import statistics, sys, time
import torch
from diffusers import UNet2DConditionModel

dry = sys.argv[1] == "1"
# Stable Diffusion 2 (768-v) UNet architecture (stabilityai/stable-diffusion-2 unet/config.json), random init
config = dict(sample_size=96, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
              freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
              layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
              norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
              dual_cross_attention=False)
batch, text = 2, 77  # batch 2: one image with classifier-free guidance (conditional + unconditional)
if dry:  # tiny architecture of the same block types, fp32 on the CPU
    config.update(sample_size=16, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                  cross_attention_dim=32, norm_num_groups=8, layers_per_block=1)
device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.float16)
with torch.device(device):
    unet = UNet2DConditionModel(**config).to(dtype).eval()
print(f"UNet2DConditionModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {dtype}, {device}")
s = config["sample_size"]
latents = torch.randn(batch, 4, s, s, device=device, dtype=dtype)
states = torch.randn(batch, text, config["cross_attention_dim"], device=device, dtype=dtype)
t = torch.tensor([500] * batch, device=device)
times = []
with torch.no_grad():
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = unet(latents, t, encoder_hidden_states=states).sample
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
assert out.shape == latents.shape and torch.isfinite(out).all(), "non-finite UNet output"
mem = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else ""
print(f"one denoising step, batch {batch}, {s}x{s} latents, {text}x{config['cross_attention_dim']} text states: "
      f"{1000 * statistics.median(times[1:]):.1f} ms median of 3 after a warm-up (first {1000 * times[0]:.0f} ms)"
      f"{mem}; 50 steps (SD2 default) = {50 * statistics.median(times[1:]):.1f} s per image")
EOF

# ---- 9. SAM refinement ----
step "9. SAM refinement (vit_t, vit_h)" "$(lim 40 300)" "$PYTHON" - "$DRY" <<'EOF'
import statistics, sys, time
from functools import partial
import torch
import refine
from toyworld import city as toycity

dry = sys.argv[1] == "1"
device = "cpu" if dry else "cuda"


def tiny_sam():  # dry run: the same classes at img_size 256 (a segment_anything Sam for both names)
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    return Sam(image_encoder=ImageEncoderViT(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                             mlp_ratio=2.0, out_chans=32, qkv_bias=True,
                                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                             window_size=4, global_attn_indexes=(1,)),
               prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                            mask_in_chans=8),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                   depth=2, embedding_dim=32, mlp_dim=64, num_heads=2), transformer_dim=32, iou_head_depth=3,
                   iou_head_hidden_dim=32))


size = 96 if dry else 768  # a generated image (official SD 768x768)
image, label = toycity.render_scene("cityscapes", seed=0, size=(size, size))
image = torch.from_numpy(image).permute(2, 0, 1).to(device)
label = torch.from_numpy(label).long().to(device)
cfg = refine.RefineConfig(min_area=100 if dry else 5000)  # official SIZE_THRESHOLD 5000 at 768
for name in ("vit_t", "vit_h"):
    torch.manual_seed(0)
    if dry:
        model, registry, SamPredictor = tiny_sam(), "segment_anything (tiny stand-in)", None
    else:
        if name == "vit_t":
            from mobile_sam import SamPredictor, sam_model_registry
        else:
            from segment_anything import SamPredictor, sam_model_registry
        with torch.device(device):
            model = sam_model_registry[name](checkpoint=None)
        registry = SamPredictor.__module__.split(".")[0]
    pred = refine.SamPointPredictor(model.to(device).eval(), SamPredictor)  # GPU: the torch image path
    times = []
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        target = refine.pseudo_label_target(image, label, pred, cfg, torch.Generator().manual_seed(0))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    devices = {v.device.type for v in target.values()}
    assert devices == {torch.device(device).type}, f"targets on {devices}, expected {device}"
    comps, _, area = refine.ops.connected_components(label)
    n = len(refine.ops.sample_points(comps, area, min_area=cfg.min_area, generator=0)[1])  # prompts (same count)
    mem = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else ""
    print(f"{name} ({registry}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters): "
          f"{size}x{size} image, {n} prompts, {len(target['labels'])} classes; pseudo_label_target "
          f"{1000 * statistics.median(times[1:]):.0f} ms median of 3 after a warm-up (first {1000 * times[0]:.0f} ms)"
          f"{mem}; targets on {device}")
    del model, pred
EOF

# ---- 10. ViT backbones ----
if [ $DRY = 1 ]; then  # tiny random-init stand-ins of the same timm classes, in-process
  step "10. ViT backbones (batch 8 x 768)" 300 "$PYTHON" bench/bench_backbones.py --tiny --no-isolate --no-teacher \
    --size 64 --batch 2 --repeats 1
else
  step "10. ViT backbones (batch 8 x 768)" 90 "$PYTHON" bench/bench_backbones.py --device cuda --batch 8 --size 768 \
    --repeats 2 --no-isolate --no-teacher --backbones convnext_large dinov2_l eva02_l
fi

{
  echo
  echo "## Summary"
  echo
  if [ $FAILED = 0 ]; then echo "all steps OK"; else echo "$FAILED step(s) FAILED"; fi
} >> "$REPORT"
echo "[gpu_check] wrote $REPORT ($FAILED failed)"
exit $FAILED
