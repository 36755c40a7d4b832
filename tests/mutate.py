"""Mutation testing by hand-written one-line bugs: does the test suite notice when the method is broken?

A developer tool, not a CI test. For each entry of MUTATIONS (name, file, old, new, test files) it copies the repo's
files (git-tracked plus untracked, not ignored) to a temp dir, replaces the exact string `old` by `new` in `file`
(it must occur exactly once), runs the listed tests there with `pytest -x -q` under a timeout, and prints a table:
killed (a test failed: good), survived (every test passed: a gap in the tests) or why it could not run. The working
tree is never modified. A "test" that starts with "python " is a command instead (the sanitizer drivers, e.g.
"python csrc/emulation/sanitize.py thread"): it runs after the pytest ones, and a non-zero exit kills the mutation.

Usage:
    python tests/mutate.py --list                      # the entries and whether their pattern still applies
    python tests/mutate.py                             # run them all, one at a time
    python tests/mutate.py --only ema_only_at_iteration_0 -k pixel --timeout 900

Adding an entry: a tuple in MUTATIONS; `old` is copied verbatim from the file (enough of the line to be unique),
`new` is the bug; the test files (or pytest node ids) are the ones that should kill it, cheapest first. A test file
that does not exist yet is skipped with a note; an `old` that is no longer in the file prints NOT APPLICABLE: update
the entry after a refactor rather than deleting it.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLOUDS_TESTS = ("tests/test_golden.py", "tests/test_clouds.py")
WIRING = "tests/test_wiring.py"
DDP = f"{WIRING}::test_ddp_first_step_gradients_match_single_process"
STRICT, MULTI = "tests/test_device_strict.py", "tests/test_multiproc.py"
BUDGET = f"{STRICT}::test_sync_budget_of_a_joint_iteration"
EMUL = "tests/test_emulation.py"
CC_CU = "csrc/connected_components_cuda.cu"
SANITIZE = "python csrc/emulation/sanitize.py"
REFINE_Q = "tests/test_refine.py::test_label_quality"

# (name, file, old, new, test files or node ids)
MUTATIONS = [
    # ---- clouds.py and criterion.py: the model and its losses (caught by the golden outputs) ----
    ("masked_attention_inverted", "clouds.py",  # Mask2Former: a query attends where its mask is >= 0.5
     "m = (m.sigmoid().flatten(2) < 0.5).detach()", "m = (m.sigmoid().flatten(2) > 0.5).detach()", CLOUDS_TESTS),
    ("msdeform_normalizer_hw", "clouds.py",  # offsets are in pixels, normalized by (w, h) of each level
     "out[lvl, 0], out[lvl, 1] = w, h", "out[lvl, 0], out[lvl, 1] = h, w", CLOUDS_TESTS),
    ("matcher_class_mask_weights_swapped", "criterion.py",  # official cost_class 2, cost_mask 5
     "C = self.cost_mask * cost_mask + self.cost_class * cost_class",
     "C = self.cost_class * cost_mask + self.cost_mask * cost_class", CLOUDS_TESTS),
    ("no_object_weight_1", "criterion.py",  # official NO_OBJECT_WEIGHT 0.1
     "empty_weight[-1] = eos_coef", "empty_weight[-1] = 1.0", CLOUDS_TESTS),
    ("dice_numerator_smoothing_dropped", "criterion.py",  # Mask2Former dice: (2 p.t + 1) / (p + t + 1)
     "loss_dice = (1 - (2 * (p * t).sum(1) + 1) /", "loss_dice = (1 - (2 * (p * t).sum(1)) /", CLOUDS_TESTS),
    ("pixel_mean_bgr", "clouds.py",  # official MODEL.PIXEL_MEAN is the CLIP mean in RGB order
     "PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)", "PIXEL_MEAN = (104.09373615, 116.7460125, 122.7709383)",
     (f"{WIRING}::test_pixel_normalization_is_clip_rgb", *CLOUDS_TESTS)),
    # ---- train.py: phase-B wiring (reference §4) ----
    ("teacher_fed_jittered_image", "train.py",  # §4.3: the teacher predicts on the clean flipped image
     'pad_batch([s["image"].to(device, non_blocking=True) for s in samples], 0)',
     'pad_batch([s["image_aug"].to(device, non_blocking=True) for s in samples], 0)',
     (WIRING,)),
    ("sam_fed_jittered_image", "train.py",  # §4.3: SAM refines on the clean flipped image
     'crops = [(image[:, :h, :w], label[:h, :w])', 'crops = [(s["image_aug"].to(device), label[:h, :w])',
     (WIRING,)),
    ("teacher_and_sam_fed_jittered_image", "data.py",  # §1.7: `image` stays un-jittered (teacher and SAM input)
     'return {**sample, "image": _to_chw(img), "image_aug": _to_chw(aug)',
     'return {**sample, "image": _to_chw(aug), "image_aug": _to_chw(aug)', (WIRING,)),
    ("student_fed_clean_image", "train.py",  # §4.3: the student sees image_aug for generated samples
     '(s["image_aug"] if s["generated"] else s["image"]).to(device, non_blocking=True)',
     's["image"].to(device, non_blocking=True)', (WIRING,)),
    ("ema_only_at_iteration_0", "train.py",  # §4.1: an EMA step every ITERATION_UPDATE iterations
     "    if state.teacher is not None:  # 1.", "    if state.teacher is not None and it == 0:  # 1.",
     (f"{WIRING}::test_saved_teacher_is_the_closed_form_ema_of_the_student",)),
    ("ema_alpha_swapped", "train.py",  # §4.1: theta_t <- 0.999 theta_t + 0.001 theta_s
     "t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)", "t.mul_(1.0 - alpha).add_(s.detach(), alpha=alpha)",
     (f"{WIRING}::test_saved_teacher_is_the_closed_form_ema_of_the_student",)),
    ("ema_every_ignored", "train.py",  # --ema-every (official ITERATION_UPDATE 100) sets the period
     "    if it % every == 0:", "    if it % 100 == 0:",
     (f"{WIRING}::test_saved_teacher_is_the_closed_form_ema_of_the_student",)),
    ("ddp_loss_times_world_size", "train.py",  # DDP averages gradients: a rank must not rescale its loss
     "    loss = sum(losses.values())", '    loss = sum(losses.values()) * state.world', (DDP,)),
    ("poly_power_1", "train.py",  # official WarmupPolyLR power 0.9
     "return max(1.0 - it / max(self.max_iter, 1), 0.0) ** self.power",
     "return max(1.0 - it / max(self.max_iter, 1), 0.0) ** 1.0",
     (f"{WIRING}::test_logged_lr_is_the_lr_used_by_that_iteration",)),
    ("lr_logged_after_step", "train.py",  # metrics.jsonl logs the LR of the iteration it reports
     '"iter": done, "lr": lr,', '"iter": done, "lr": state.scheduler.get_last_lr()[0],',
     (f"{WIRING}::test_logged_lr_is_the_lr_used_by_that_iteration",)),
    ("clip_norm_ignored", "train.py",  # official CLIP_GRADIENTS full_model L2 0.01 (--clip-grad)
     "clip_grad_norm_(state.params, cfg.clip_grad)", "clip_grad_norm_(state.params, 10 * cfg.clip_grad)",
     (f"{WIRING}::test_gradients_are_clipped_at_clip_grad",)),
    # ---- backbones.py: ViT backbones, Rein, LoRA (issue 19) ----
    ("rein_softmax_over_patches", "backbones.py",  # each patch attends over the layer's m tokens
     "attn = torch.softmax(f @ t.t() / math.sqrt(self.dim), dim=-1)",
     "attn = torch.softmax(f @ t.t() / math.sqrt(self.dim), dim=1)", ("tests/test_backbones.py",)),
    ("rein_refines_the_class_token", "backbones.py",  # Rein: class (and register) tokens excluded
     "                    h = self.rein(h, i, self.prefix)", "                    h = self.rein(h, i, 0)",
     ("tests/test_backbones.py",)),
    ("feature_maps_keep_a_prefix_token", "backbones.py",  # the maps hold the patch tokens only
     "maps.append(h[:, self.prefix:].transpose(1, 2)", "maps.append(h[:, self.prefix - 1:-1].transpose(1, 2)",
     ("tests/test_backbones.py",)),
    ("res5_nearest_not_mean", "backbones.py",  # Rein: x0.5 resize (bilinear = the 2x2 mean)
     'mode="bilinear", align_corners=False)\n                 for i', 'mode="nearest")\n                 for i',
     ("tests/test_backbones.py",)),
    ("lora_scaling_dropped", "backbones.py",  # LoRA: alpha / r
     "F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling", "F.linear(F.linear(x, self.lora_a), self.lora_b)",
     ("tests/test_backbones.py",)),
    ("teacher_ignores_the_adapter", "train.py",  # issue 19: the teacher averages its own copy of the adapter too
     "source = EMASource(model) if tunes else None", "source = None",
     ("tests/test_backbone_runs.py::test_teacher_holds_its_own_copy_of_the_adapter",)),
    ("slide_counts_ignored", "evaluate.py",  # overlapping windows are averaged
     "    scores = total / count  # (B, C, H, W)", "    scores = total  # (B, C, H, W)",
     ("tests/test_eval_protocol.py",)),
    # ---- issue 15: the GPU path (device-strict tensors, host syncs, signals, several ranks) ----
    ("plot_numpy_of_device_labels", "runtools/runs.py",  # finding 1: CUDA tensors refuse numpy
     "records = [(np.asarray(image), _host(teacher), _host(refined))",
     "records = [(np.asarray(image), teacher, refined)", (f"{STRICT}::test_plot_of_device_labels",)),
    ("matcher_indices_blocking_copy", "criterion.py",  # finding 5: the indices come back asynchronously
     "flat = flat.to(device, non_blocking=True)", "flat = flat.to(device)", (BUDGET,)),
    ("msdeform_normalizer_host_tensor", "clouds.py",  # finding 5: a torch.tensor(..., device) per forward
     "normalizer = level_sizes(shapes, query)  # (nL, 2)",
     "normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)", (BUDGET,)),
    ("loss_item_per_term", "runtools/runs.py",  # finding 5: one host transfer for every logged number
     "host = torch.cat([values, finite]).cpu().tolist()",
     "host = [v.item() for v in torch.cat([values, finite])]", (f"{STRICT}::test_sync_budget_of_a_joint_iteration",)),
    ("no_barrier_after_the_stop_save", "runtools/runs.py",  # finding 3: every rank waits for rank 0's last.pt
     "        barrier(env)  # every rank waits", "        pass  # every rank waits",
     (f"{MULTI}::test_stop_signal_saves_once_and_every_rank_exits_143[workers]",)),
    ("forwarded_ctrl_c_aborts", "runtools/runs.py",  # finding 3: torchrun forwards the Ctrl-C the workers already got
     "REPEAT_GRACE = 5.0", "REPEAT_GRACE = 0.0", ("tests/test_gpu_path.py::test_repeated_signals",)),
    ("stop_not_polled_in_evaluation", "evaluate.py",  # finding 3: a stop during an evaluation
     "if stop is not None and i % STOP_POLL == 0 and i < common and stop():",
     "if False:", ("tests/test_gpu_path.py::test_stop_during_evaluation_saves_then_resume_redoes_the_evaluation",)),
    ("rank0_writes_before_the_verdict", "train.py",  # finding 6: the preflight race
     "    if runs.any_rank(env, problems is not None):", "    if problems is not None:",
     (f"{MULTI}::test_rank0_writes_nothing_before_every_rank_checked_out",
      f"{MULTI}::test_a_problem_on_rank_1_alone_stops_rank_0_before_it_writes")),
    ("cuda_build_failure_ignored", "runtools/preflight.py",  # finding 4: stop before training, name the first error
     "    if cfg.allow_ops_fallback:\n        ops.fallback(problem)", "    if True:\n        ops.fallback(problem)",
     ("tests/test_gpu_path.py::test_cuda_build_failure_is_a_problem_with_the_first_compiler_error",)),
    ("label_crop_box_nearest", "data.py",  # finding 7: the label crop is exactly the crop of the rescaled label
     "rows, cols = nearest_positions(H, size[0], y0, h)[:, None], nearest_positions(W, size[1], x0, w)[None, :]",
     "rows, cols = (np.arange(y0, y0 + h) * H // size[0])[:, None], (np.arange(x0, x0 + w) * W // size[1])[None, :]",
     ("tests/test_data.py::test_train_crop_is_the_crop_of_the_rescaled_sample",)),
    ("text_tower_moved_to_the_gpu", "clouds.py",  # finding 7: the CLIP text tower stays on the CPU
     "        if recurse and probe.device != torch.device(\"cpu\"):", "        if False:",
     (f"{STRICT}::test_modules_move_to_the_device_but_the_clip_text_tower_stays",)),
    # ---- csrc/*_cuda.cu: the CUDA kernels, run by the emulation (csrc/emulation/) and its sanitizer drivers ----
    ("uf_unite_without_retry", CC_CU,  # a lost atomicMin race must retry from the new roots
     "  } while (!done);", "  } while (false);", (f"{EMUL}::test_emul_components_equal_cpu",)),
    ("uf_flatten_one_hop", CC_CU,  # flatten must follow the whole chain to the root
     "if (p >= 0) volatile_store(parent + i, find_root(parent, static_cast<int32_t>(i)));",
     "if (p >= 0) volatile_store(parent + i, volatile_load(parent + p));",
     (f"{EMUL}::test_emul_components_equal_cpu",)),
    ("uf_row_guard_dropped", CC_CU,  # a batch is one tall image: row r % H == 0 never links to the row above
     "  if (r % H != 0) {", "  if (r > 0) {", (f"{EMUL}::test_emul_components_equal_cpu",)),
    ("uf_diagonal_bound_off_by_one", CC_CU,  # the up-right neighbour exists only for c < W - 1
     "if (diag && c < W - 1 && lab[up + 1] == l)", "if (diag && c < W && lab[up + 1] == l)",
     (f"{EMUL}::test_emul_components_equal_cpu",)),
    ("uf_area_leader_off_by_one", CC_CU,  # one lane per group of equal ids adds the group's pixel count
     "static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1", "static_cast<int>(threadIdx.x & 31) == __ffs(peers)",
     (f"{EMUL}::test_emul_components_equal_cpu",)),
    ("uf_left_read_out_of_bounds", CC_CU,  # reads lab[-1] at pixel 0 (the result does not change: ASan's)
     "if (c > 0 && lab[i - 1] == l)", "if (lab[i - 1] == l && c > 0)",
     (f"{SANITIZE} address --ops connected_components --schedules 0",)),
    ("uf_plain_parent_read", CC_CU,  # F4: parent[i] is read while others atomicMin it (a race: TSan's)
     "if (i >= n || volatile_load(parent + i) < 0) return;", "if (i >= n || parent[i] < 0) return;",
     (f"{SANITIZE} thread --ops connected_components --schedules 0,1",)),
    ("msda_backward_plain_add", "csrc/ms_deform_attn_cuda.cu",  # samples share value pixels: grad_value needs atomics
     "      atomicAdd(gc + d, wa * gd);", "      gc[d] += wa * gd;",
     (f"{SANITIZE} thread --ops ms_deform_attn --schedules 0,1",)),
    ("msda_backward_empty_grid", "csrc/ms_deform_attn_cuda.cu",  # F2: <<<0, 256>>> is an invalid launch
     "  if (n == 0) return;  // no samples (nL or nP is 0): the gradients stay zero\n", "",
     (f"{EMUL}::test_emul_empty_launches",)),
    ("msda_fma_source_coord", "csrc/ms_deform_attn_cuda.cu",  # F1: the CPU kernel's rounding, not nvcc's FMA
     "return (mul_rn(g + T(1), static_cast<T>(n)) - T(1)) / T(2);",
     "return fma(g + T(1), static_cast<T>(n), -T(1)) / T(2);",
     (f"{EMUL}::test_emul_deform_attn_same_cells_as_cpu",)),
    ("semantic_right_edge_off_by_one", "csrc/masks_to_semantic_cuda.cu",  # the last source column has no right one
     "i1 = i0 + (i0 < in - 1 ? 1 : 0);", "i1 = i0 + (i0 < in ? 1 : 0);", (f"{EMUL}::test_emul_semantic_equal_cpu",)),
    ("points_cuda_unchecked_candidates", "csrc/sample_points.cpp",  # F3: the CPU op's checks, on the CUDA path too
     "  if (h[0] < 0 || h[1] >= num_components || h[2]) candidate_slots(", "  if (false) candidate_slots(",
     (f"{EMUL}::test_emul_points_reject_what_cpu_rejects",)),
    # ---- refine.py, data.py, generate.py: pseudo-label quality against ToyCity's hidden truth (issue 18) ----
    ("quality_dropped_counted_as_class_0", "refine.py",  # a dropped (255) pixel names no class
     "column = torch.where((pred >= 0) & (pred < C), pred, C)", "column = torch.where(pred < C, pred, 0)",
     (f"{REFINE_Q}_hand_computed", f"{REFINE_Q}_matches_brute_force")),
    ("quality_class_range_off_by_one", "refine.py",  # classes are 0..C-1 (class 0 is a class, not dropped)
     "column = torch.where((pred >= 0) & (pred < C), pred, C)",
     "column = torch.where((pred > 0) & (pred < C), pred, C)", (f"{REFINE_Q}_matches_brute_force",)),
    ("quality_ignored_truth_scored", "refine.py",  # truth 255 is not scored
     "scored = (truth >= 0) & (truth < C)", "scored = truth >= 0", (f"{REFINE_Q}_hand_computed",)),
    ("quality_dropped_not_a_miss", "refine.py",  # strict mIoU: a dropped pixel is a miss of its true class
     "iou, miou = mean_iou(kept, conf.sum(1))", "iou, miou = mean_iou(kept, kept.sum(1))",
     (f"{REFINE_Q}_hand_computed",)),
    ("quality_mean_over_predicted_classes", "refine.py",  # evaluate.py: classes absent from the truth left out
     "present = n_true > 0", "present = (n_true + kept.sum(0)) > 0", (f"{REFINE_Q}_hand_computed",)),
    ("quality_acc_over_all_scored_pixels", "refine.py",  # acc is over the kept (labelled) pixels
     '"acc": float(kept.diag().sum()) / n_kept if n_kept else nan,',
     '"acc": float(kept.diag().sum()) / total if n_kept else nan,', (f"{REFINE_Q}_hand_computed",)),
    ("truth_not_flipped_with_the_image", "data.py",  # the truth must stay aligned with the teacher's clean image
     'maps = {k: sample[k] for k in ("label", "truth") if k in sample}', 'maps = {"label": sample["label"]}',
     ("tests/test_data.py::test_every_transform_moves_the_hidden_truth_like_the_label",
      "tests/test_generate.py::test_toy_writes_the_hidden_truth_that_training_never_reads")),
    ("truth_listed_as_images", "data.py",  # truth/*.png must never be read as generated images
     'images = _glob(image_dir, ".png", recursive=False)', 'images = _glob(root, ".png", recursive=True)',
     ("tests/test_generate.py::test_toy_writes_the_hidden_truth_that_training_never_reads",)),
    ("truth_read_as_the_label", "data.py",  # training reads "label": it must stay all ignore for generated images
     'sample["truth"] = torch.from_numpy(truth)', 'sample["truth"] = sample["label"] = torch.from_numpy(truth)',
     ("tests/test_generate.py::test_toy_writes_the_hidden_truth_that_training_never_reads",
      "tests/test_train.py::test_pseudo_label_quality_is_logged_and_the_hidden_truth_never_trains")),
    ("refined_quality_scores_the_teacher", "runtools/runs.py",  # the refined column scores the refined labels
     "state.pseudo_conf[1] += refine.label_confusion(ref.to(state.device), truth)",
     "state.pseudo_conf[1] += refine.label_confusion(teacher, truth)",
     ("tests/test_train.py::test_pseudo_label_quality_is_logged_and_the_hidden_truth_never_trains",)),
    # ---- issue 18: the toy recipe's CPU threads, applied where the runs start ----
    ("train_ignores_cpu_threads", "train.py",  # a loaded machine: 30-50x slower toy iterations at 2 threads
     "stop, ops.cpu_threads(cfg.cpu_threads):", "stop:", ("tests/test_threads.py",)),
    ("cpu_threads_not_restored", "ops.py",  # train.main in-process leaves the caller's thread count as it was
     "        if threads:\n            torch.set_num_threads(before)", "        pass", ("tests/test_threads.py",)),
    # ---- issue 18: the toy joint phase keeps the warmup's backbone frozen (Sec. 3.1); the toy SAM's region cache ----
    ("freeze_backbone_joint_ignored", "train.py",  # the joint phase would train the backbone the paper keeps frozen
     "trains_backbone = cfg.train_backbone and not (joint and cfg.freeze_backbone_joint)",
     "trains_backbone = cfg.train_backbone",
     ("tests/test_train.py::test_freeze_backbone_joint_trains_the_backbone_in_the_warmup_only",)),
    ("frozen_backbone_keeps_its_graph", "train.py",  # out of the optimizer but still back-propagated through
     "        model.backbone.freeze()", "        pass",
     ("tests/test_train.py::test_freeze_backbone_joint_trains_the_backbone_in_the_warmup_only",)),
    ("toy_sam_cache_keyed_on_shape", "toyworld/sam.py",  # another image of the same size served stale regions
     "key = (image.shape, hashlib.blake2b(image.data, digest_size=16).digest())", "key = (image.shape,)",
     ("tests/test_refine.py::test_toy_predictor_cache_returns_what_a_fresh_predictor_computes",)),
    ("demo_table_of_all_toy_targets", "toyworld/demo.py",  # --eval-sets cityscapes: KeyError at the table
     "for t in cfg.eval_sets}", "for t in TOY_TARGETS}",
     ("tests/test_demo.py::test_the_table_has_the_sets_evaluated",)),
    ("old_config_missing_field_ignored", "runtools/preflight.py",  # an old toy run resumed frozen without a word
     "    old = {**{k: v for k, v in ADDED_FIELDS.items() if k not in old}, **old}", "    pass",
     ("tests/test_train_cli.py::test_resume_names_a_change_of_what_trains",)),
    ("resume_other_tensors_traceback", "runtools/runs.py",  # the optimizer's ValueError instead of one message
     "    if saved != now:  # what trains changed", "    if False:  # what trains changed",
     ("tests/test_train_cli.py::test_resume_names_a_change_of_what_trains",)),
]


def repo_files(root: Path) -> list:
    """Tracked files plus untracked ones that git does not ignore (a new test file counts before its commit)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def applicable(entry, root: Path = ROOT) -> str:
    """'' when `old` occurs exactly once in the file, else the reason the entry cannot run."""
    name, file, old, new, _ = entry
    path = root / file
    if not path.is_file():
        return f"NOT APPLICABLE (no file {file}: update the entry)"
    n = path.read_text().count(old)
    if n == 0:
        return "NOT APPLICABLE (pattern not found: update the entry)"
    if n > 1:
        return f"NOT APPLICABLE (pattern found {n} times: make `old` unique)"
    return ""


def _first_failure(output: str) -> str:
    """'tests/x.py::test_y: first E line' from pytest's output (either part may be missing)."""
    test = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    error = re.search(r"^E +(.+)$", output, re.M)
    return ": ".join(m.group(1)[:100] for m in (test, error) if m)


def run_one(entry, timeout: float, root: Path = ROOT) -> dict:
    """Apply one mutation in a fresh copy of the repo, run its tests, return {name, status, first_failure, seconds,
    notes}. status: killed | survived | timeout (counted as killed) | NOT APPLICABLE ... | NO TESTS | ERROR ..."""
    name, file, old, new, tests = entry
    row = {"name": name, "file": file, "status": "", "first_failure": "", "seconds": 0.0, "notes": []}
    reason = applicable(entry, root)
    if reason:
        row["status"] = reason
        return row
    present, commands = [], [t for t in tests if t.startswith("python ")]
    for t in tests:
        if t in commands:
            continue
        if (root / t.split("::")[0]).is_file():
            present.append(t)
        else:
            row["notes"].append(f"skipped {t.split('::')[0]} (does not exist)")
    if not present and not commands:
        row["status"] = "NO TESTS"
        return row
    with tempfile.TemporaryDirectory(prefix=f"mutate_{name}_") as tmp:
        tmp = Path(tmp)
        for f in repo_files(root):
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, tmp / f)
        path = tmp / file
        path.write_text(path.read_text().replace(old, new, 1))
        runs = [[sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *present]] if present else []
        runs += [[sys.executable, *shlex.split(c)[1:]] for c in commands]
        t0 = time.perf_counter()
        for cmd in runs:
            try:
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                      timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                row.update(status="timeout", seconds=round(time.perf_counter() - t0, 1))
                return row
            row["seconds"] = round(time.perf_counter() - t0, 1)
            output = proc.stdout + proc.stderr
            if cmd[1:3] != ["-m", "pytest"]:  # a command: any failure kills; its last line says why
                if proc.returncode != 0:
                    last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
                    row.update(status="killed", first_failure=f"{shlex.join(cmd[1:3])}: {last[0].strip()[:100]}")
                    return row
            elif proc.returncode == 1:
                row.update(status="killed", first_failure=_first_failure(output))
                return row
            elif proc.returncode != 0:  # 2 interrupted (e.g. a collection error), 4 usage error, 5 no tests collected
                row.update(status=f"ERROR (pytest exit {proc.returncode})", first_failure=_first_failure(output))
                return row
        row["status"] = "survived"
    return row


def format_table(rows) -> str:
    lines = [f"{'mutation':<36} {'result':<10} {'s':>6}  first failing test / note"]
    for r in rows:
        detail = r["first_failure"] or "; ".join(r["notes"])
        if r["first_failure"] and r["notes"]:
            detail += f"  ({'; '.join(r['notes'])})"
        lines.append(f"{r['name']:<36} {r['status']:<10} {r['seconds']:>6.0f}  {detail}")
    return "\n".join(lines)


def select(entries, only=(), keyword=None) -> list:
    names = {e[0] for e in entries}
    unknown = sorted(set(only) - names)
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; valid: {', '.join(e[0] for e in entries)} (see --list)")
    out = [e for e in entries if (not only or e[0] in only) and (keyword is None or keyword in e[0])]
    if not out:
        raise SystemExit(f"no mutation matches --only {list(only)} -k {keyword!r}; see --list")
    return out


def main(argv=None) -> list:
    """Run the selected mutations; returns the rows (dicts) of the printed table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the entries and whether they apply, run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this entry (repeatable)")
    parser.add_argument("-k", dest="keyword", default=None, help="run the entries whose name contains this string")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (each in its own copy)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation (a timeout counts as "
                        "killed: the suite noticed something)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    entries = select(MUTATIONS, args.only, args.keyword)
    if args.list:
        for e in entries:
            print(f"{e[0]:<36} {e[1]:<12} {applicable(e) or 'ok':<10} tests: {', '.join(e[4])}")
        return [{"name": e[0], "file": e[1], "status": applicable(e) or "ok"} for e in entries]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.jobs == 1:
        rows = []
        for e in entries:
            rows.append(run_one(e, args.timeout))
            print(format_table(rows[-1:]).splitlines()[1], flush=True)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda e: run_one(e, args.timeout), entries))
    print()
    print(format_table(rows))
    survived = [r["name"] for r in rows if r["status"] == "survived"]
    print(f"\n{sum(r['status'] in ('killed', 'timeout') for r in rows)} killed, {len(survived)} survived"
          + (f" ({', '.join(survived)})" if survived else "") + f", {len(rows)} entries")
    return rows


if __name__ == "__main__":
    main()
