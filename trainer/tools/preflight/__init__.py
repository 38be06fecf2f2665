"""Preflight: check every rank's GPU, network, data and run folder in seconds, before a long training job.

    ./launch.sh train --preflight -- --train-data D/train --val-data D/val --run-dir R     (the trainer's ranks)
    deepspeed --num_gpus 8 --module trainer.tools.preflight --train-data D/train --run-dir R
    torchrun --nproc_per_node 8 -m trainer.tools.preflight ...      srun python -m trainer.tools.preflight ...
    python -m trainer.tools.preflight --train-data D/train --run-dir R                           (a plain single process)

Why: a cluster job can wait an hour in the queue and then fail in its first minute, on a node whose GPUs the
container cannot see, a network the ranks cannot reach each other over, shards a node cannot read, or a run folder
it cannot write (a read-only or unmounted volume, the wrong owner). Run with the same launcher, nodes and paths as
the training job, the preflight finds each of these in seconds and names the host and rank at fault.

On every rank (the launcher's variables are read by trainer/engine/dist.py, as for the trainer):
- device: the GPU the rank will use (name, free and total memory); a CUDA device file without a usable CUDA device
  (a driver or container problem), a local rank with no GPU of its own, or a GPU already mostly full
  (--min-free-fraction) fails; without GPUs the device is "cpu" (host memory shown), which fails only with
  --require-gpu;
- all-reduce: the process group forms (gloo on CPU, NCCL on GPUs, as the trainer's), every rank gets the right
  sum, and the time of an all-reduce at a few message sizes (--sizes) gives the latency and the bus bandwidth as
  NCCL's tests define it: busbw = algbw * 2 (n - 1) / n, where algbw = bytes / time and n is the world size
  (the slowest rank's time is reported);
- data: for each shard folder given (--train-data, --val-data), the manifest, answers and files are present, and
  the first 2 samples of the rank's first shard (where its share of the data starts) are read through the index:
  every component complete, the json parses, the image decodes;
- run folder (--run-dir): created if missing (as the trainer would), and a test file written, synced, read back
  and deleted; a folder the preflight created is removed again. With several ranks, the folder must also be the
  same one on every rank: rank 0 writes a probe file with a random token and every rank reads it back from its own
  --run-dir. A rank that does not find it (a node's local disk at that path instead of one shared filesystem)
  fails with a line saying the run folder is not shared between nodes: each node would keep its own part of every
  checkpoint, and no node could resume. Its outcome shows in the table's run-folder column.

Rank 0 gathers every rank's results and prints one table (one row per rank) and the all-reduce table. Exit status:
0 every check passed; 1 a check failed (one `error:` line on stderr names the first failing host, rank and check);
2 bad arguments or launcher variables. Arguments the preflight does not know (the trainer's, e.g. --preset) are
ignored, so that `--preflight` can be added to any training command.
"""
