"""`python -m trainer.tools.bench`: training throughput of the model variants: one table at the end, the same numbers in JSON.

    python -m trainer.tools.bench --preset vqa2-base --variants clip-infonce-dot,baseline --image-sizes 384,224 \\
        --batch-size 256 --modes synthetic,shards,plain --train-data DIR --set model.compile=true
    python -m trainer.tools.bench --preset tiny --train-data data/easy-vqa/train          (the CPU: the tiny model)

Every variant x image size x mode is one cell. A cell builds the task (model + losses, random weights: a preset's
pretrained names are dropped, speed does not depend on them and nothing here reaches the network) with the project's
own builders, trains `--warmup` steps untimed (the first one compiles under model.compile), then `--repeats` windows of
`--steps` optimizer steps; the table shows the median window. The device is synchronised only at the ends of a window,
so the host runs ahead of the device as in training. Per cell:

- samples/s and step time (one optimizer step = one micro-batch of `--batch-size`);
- peak memory: CUDA max allocated on a GPU; on the CPU the process's peak resident set (VmHWM), reset before the
  timed windows: a process figure, not a device-memory one;
- model FLOPs utilisation: the FLOPs of one training step (forward and backward of the real task on a batch of the
  real shape, counted by `torch.utils.flop_counter.FlopCounterMode`) x steps/s over a matrix-product peak measured in
  this run on this device (bf16 on a GPU, where each cell is compared with the peak of its own precision; fp32 and
  bf16 on the CPU, where the faster of the two is the basis; the table says which);
- the fraction of the window spent waiting for the next batch (as train/data_wait_fraction in training).

Modes:
- synthetic: one batch already on the device, reused every step: the model in the DeepSpeed engine (trainer/engine/engine.py)
  alone;
- shards: shards from --train-data through `build_loader` (DALI's GPU decoder on a GPU), end to end through the engine;
- plain: the same task in the training step without DeepSpeed (trainer/engine/plain.py: torch's AdamW, same param groups and
  schedule), bf16 by autocast where the DeepSpeed config is bf16: its difference to `synthetic` is the engine's
  overhead.

Without --train-data the model has VQA v2's 3,129 answers and BERT's 30,522-token vocabulary (ViLT's); with it, the
data's answers and a vocabulary built from its questions, in every mode. It runs in one process (on a GPU, or on the
CPU with a 1-rank gloo group, as trainer/engine/dist.py sets up), so OpenMP keeps its default wait policy as one rank of
trainer/main.py does; set OMP_WAIT_POLICY to measure another. docs/performance.md has the figures measured with it.

The modules: `measure.py` (matrix-product peaks, FLOPs of a step, peak memory, the timed windows, the profiler),
`cells.py` (what runs in a cell: the engines, the batches, transformers' ViLT), `report.py` (the JSON report and the
table), `cli.py` (the command line and the run over the cells).
"""
