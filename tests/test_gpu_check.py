"""bench/gpu_check.sh --dry-run: every step of the GPU check at tiny size on the CPU, into the same report."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("0. imports", "1. build csrc/", "2. CUDA op tests", "3. bench_ops", "4. ms_deform_attn fwd+bwd",
            "5. real_scale", "6. host syncs per joint iteration", "7. torchrun 2 ranks", "8. SD2 UNet step (fp16)",
            "9. SAM refinement (vit_t, vit_h)", "10. ViT backbones (batch 8 x 768)", "Summary")


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    report = tmp_path / "gpu_report.md"
    # the build cache test_multiproc's ranks share: csrc/ is built once in the suite (a fresh clone builds it here)
    env = {"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache/torch_extensions"), **os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--report", str(report),
                          "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True)
    text = report.read_text()
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{text[-4000:]}"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert tuple(headings) == SECTIONS
    assert "FAILED" not in text and text.count("status: OK") == len(SECTIONS) - 1
    assert "all steps OK" in text
    # each step printed its measurement
    assert "one denoising step, batch 2" in text and "vit_h (" in text and "| cpu | 2 | fast |" in text
    assert "| dinov2_l/rein [dinov2_tiny] |" in text and "| eva02_l/lora [eva02_tiny] |" in text
    assert "built and loaded" in text and "speed-up" in text and "[real_scale] resume: joint resumed from" in text
    assert "joint iteration at batch 2 on emulated" in text and "synchronizations" in text
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--dry-run" in bad.stderr
