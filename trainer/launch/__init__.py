"""What `./launch.sh train` and `./launch.sh tensorboard` do, as Python that tests can call: launch.sh sets up the
virtual environment and hands over to `python -m trainer.launch`.

- `cli`: the command line, `train`'s checks of its options, and the commands it runs or prints (--dry-run).
- `context`: what both commands share (where the launch runs, a dry run, the split of a command's own options).
- `help`: `train`'s argparse parser and help, `tensorboard`'s help.
- `board`: `tensorboard`.
- `hosts`: the nodes (a DeepSpeed hostfile), this host's GPUs, names and free rendezvous ports.
- `node_env`: the environment every node's processes get, and DeepSpeed's log level.
- `relay`: the launcher in a session of its own, SIGTERM and SIGINT passed to every rank, and the last line of a run
  a signal stopped.

Only the standard library (and `common.errors`, which imports nothing): `./launch.sh train --help` and
`--dry-run` work before the set-up has installed anything.
"""
