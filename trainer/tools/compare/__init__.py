"""The paper's experiment as one command: train every variant with the same seeds, data order and hyperparameters,
then write `results.json`, `loss_curves.png` (the paper's Figure 3, plus validation VQA score) and `report.md`.

    python -m trainer.tools.compare --preset demo --train-data data/easy-vqa/train --val-data data/easy-vqa/test \
        --run-dir runs/demo --variants baseline,clip-no-infonce,clip-infonce-cos,clip-infonce-dot \
        --val-subset 500 --val-every 100 --seeds 0

A variant is `NAME[+MODIFIER]` (variants.py): NAME a model variant of the trainer, MODIFIER `dup-mask` or
`dup-positive`, which sets `loss.duplicate_questions` for an InfoNCE variant; `clip-infonce-dot+dup-mask` is model (3)
with identical questions of a batch masked out of InfoNCE, and is also checked against `clip-infonce-dot`.

Each run goes through the real stack (shards -> loader -> DeepSpeed engine -> TensorBoard) as its own process:
`deepspeed trainer/main.py` on `--gpus-per-run` GPUs (default 1) where there are GPUs, `python trainer/main.py` (one
CPU rank) otherwise. `--jobs` runs side by side (default auto: one run per GPU or group of --gpus-per-run GPUs, each
with its own CUDA_VISIBLE_DEVICES and rendezvous port; on the CPU one run per --threads-per-run cores, default 1), and
a run's numbers do not depend on it: its thread count is the comparison's setting, recorded in results.json
(schedule.py). A comparison is resumable: finished runs are kept, interrupted ones continue from their last
checkpoint; a failed run is named with its log while the others finish. `--only V --seeds S` runs one cell of a
study (e.g. one node of a Slurm job array, docs/cluster.md) and `--report-only` gathers the report from the run
folders once every cell is done.

Validation: every `--val-every` steps on --val-data; with `--val-subset N`, on a fixed subset of N of its questions
instead (a shard folder written once in --run-dir by data_pipeline/convert/subset.py, seed 0, the same for every run), and
each run's last checkpoint is then scored on the whole --val-data by the trainer's own `--eval-only` (in the run's
slot, right after its training, so that scoring too runs beside the other runs), in a run folder
RUN/full_eval that reads RUN/checkpoints through a link (results in RUN/full_eval/eval/<tag>/). The report shows the
subset curve per variant and the whole-split score. A run interrupted at any point (kill -9 included) continues with
the same command: its trainer restarts with `--resume auto`.

What is compared: the VQA loss (comparable across variants; the total loss of the InfoNCE variants also holds
lambda * InfoNCE), the step from which its smoothed curve stays under each threshold, validation VQA score, and the
step-to-step noise of the loss late in training (the paper's "steadier").

How, so that the numbers can carry a verdict:
- Smoothing without lag: a local linear fit over a centred window of `--smooth-steps` training steps (a straight
  line through the raw points around each step, read at that step). A ramp comes back unchanged and a step change is
  crossed where it happens, so "steps until the loss stays under t" measures the run, not the filter. (An EMA of
  weight 0.9 per logged point lags by about ten logging intervals on a falling curve.)
- Noise ("steadiness"): the standard deviation of successive differences of log(VQA loss) over the second half of
  training, divided by sqrt(2): the noise of one logged point, in relative terms. A trend adds the same amount to
  every difference, so the slope of the curve does not enter it.
- Verdicts: a difference between two variants is claimed ("supports" / "contradicts") only when the difference of
  their means over seeds is larger than the larger of their two seed ranges (max - min); otherwise, and always with
  one seed, it is "not resolved". The training-time claim is checked against ViLT (`baseline`) and against the
  ablation without InfoNCE (`clip-no-infonce`), which isolates the alignment from the CLIP tower; a variant with a
  modifier against the plain variant it modifies (claims.py).

The modules: `variants.py` (the --variants syntax), `results.py` (reading a finished run's TensorBoard events and
whole-split evaluation; smoothing, noise and the verdict rule; results.json and its schema), `claims.py` (which
claims the variants allow, each with its verdict), `runs.py` (the validation subset; one trainer process per variant
and seed, resumable, side by side; the whole-split evaluation), `schedule.py` (the slots of runs side by side: threads,
GPUs, ports), `report.py` (loss_curves.png and report.md), `cli.py` (the command
line).
"""
