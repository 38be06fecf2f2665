"""Every command README.md and docs/cluster.md tell a user to run, taken from the docs' own text and run.

The commands are read from the docs' fenced `bash` blocks (found by a stable prefix of one of their commands), so
that a doc and its test cannot drift: a changed option, path or file name in a doc changes what runs here. Host
folders (`/mnt/...`, the README's `RAW/`) become temporary ones. Each block runs with bash in a copy of the checkout
whose programs the test machine lacks or must not run for real are stand-ins (tests/helpers/doc_standins.py):
docker runs the image's entry point on the host with its volumes' paths translated, sbatch and srun run the batch
script and its tasks here, kubectl records the manifest, DeepSpeed's launcher and the trainer record their
arguments. What the stand-ins record is then checked by the real parsers: DeepSpeed's own launcher options
(deepspeed.launcher.runner), trainer/main.py's options, the preset and every `--set` field, trainer.tools.preflight's,
trainer.tools.compare's and data_pipeline.convert's options. What is cheap runs for real: the VQA v2 conversions (on a
synthetic VQA v2 stand-in for the visualqa.org and COCO downloads), `fetch-weights` (against a local stand-in for the
Hugging Face hub), the universal-checkpoint conversion and the export (against the run folder the page's training
writes; the export also on a real tiny run, marked slow). Downloads themselves are the exceptions; `test_every_documented_command_is_exercised_or_excepted` lists
where each command is tested, or why it is not, and fails on a command the list does not know.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.helpers import doc_standins

REPO = Path(__file__).resolve().parents[1]
README = "README.md"
CLUSTER = "docs/cluster.md"
HOSTS = ("node0", "node1")

# -- the docs' commands --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    section: str
    text: str
    """As written: continuation lines and a here-document's body included."""

    @property
    def line(self) -> str:
        """The command line alone: continuations joined, a trailing comment and a here-document's body dropped."""
        first = self.text.split("\n")
        joined = []
        for part in first:
            joined.append(part.rstrip().removesuffix("\\"))
            if not part.rstrip().endswith("\\"):
                break
        line = " ".join(" ".join(joined).split())
        return re.sub(r"\s+#\s.*$", "", line)


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str
    section: str
    lang: str
    text: str

    def commands(self) -> list[Command]:
        return [Command(self.doc, self.section, text) for text in split_commands(self.text)]


def blocks(doc: str) -> list[Block]:
    """The fenced code blocks of DOC, each with the heading it is under."""
    found, section, lang, lines = [], "", None, []
    for line in (REPO / doc).read_text().splitlines():
        if lang is None and line.startswith("```"):
            lang, lines = line[3:].strip(), []
        elif lang is not None and line.startswith("```"):
            found.append(Block(doc, section, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    return found


def split_commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines and here-documents kept with their command; comment lines and
    blank lines left out."""
    lines, commands, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        command = [lines[i]]
        while command[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", " ".join(command))
        if heredoc:
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
                command.append(lines[i])
        commands.append("\n".join(command))
        i += 1
    return commands


def shell_commands(doc: str) -> list[Command]:
    return [c for block in blocks(doc) if block.lang == "bash" for c in block.commands()]


def block(doc: str, prefix: str) -> Block:
    """The one bash block of DOC with a command starting with PREFIX."""
    matches = [
        b for b in blocks(doc) if b.lang == "bash" and any(c.line.startswith(prefix) for c in b.commands())
    ]
    assert len(matches) == 1, f"{doc}: {len(matches)} bash blocks with a command starting {prefix!r}"
    return matches[0]


def command(doc: str, prefix: str) -> Command:
    matches = [c for c in shell_commands(doc) if c.line.startswith(prefix)]
    assert len(matches) == 1, f"{doc}: {len(matches)} commands starting {prefix!r}"
    return matches[0]


def inline_code(doc: str) -> list[str]:
    """The `code spans` of DOC's prose (fenced blocks left out), line breaks inside a span joined."""
    text = re.sub(r"^```.*?^```", "", (REPO / doc).read_text(), flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def printed_block(doc: str, prefix: str) -> list[str]:
    """The lines of the one plain (not bash) fenced block of DOC starting with PREFIX: output the doc shows."""
    matches = [b for b in blocks(doc) if not b.lang and b.text.startswith(prefix)]
    assert len(matches) == 1, f"{doc}: {len(matches)} output blocks starting {prefix!r}"
    return matches[0].text.splitlines()


# -- where each command is tested ------------------------------------------------------------------------------------

HERE = "test_docs_commands.py"
# (doc, prefix of the command line, where it is exercised: FILE::TEST, or "excepted: why"); the longest matching
# prefix wins.
EXERCISED = [
    (README, "./launch.sh demo", f"{HERE}::test_readme_quick_start_runs_the_demo_and_the_tests"),
    (README, "./launch.sh test", f"{HERE}::test_readme_quick_start_runs_the_demo_and_the_tests"),
    (README, "VQA_DEMO_RUN_DIR=runs/demo-5seeds ./launch.sh demo", f"{HERE}::test_readme_five_seed_study"),
    (README, "mkdir -p results/demo_5seeds", f"{HERE}::test_readme_five_seed_study"),
    (README, "./launch.sh setup; PY=.venv/bin/python", f"{HERE}::test_readme_vqa2_conversion_on_a_local_stand_in"),
    (README, "$PY -m data_pipeline.convert", f"{HERE}::test_readme_vqa2_conversion_on_a_local_stand_in"),
    (README, ".venv/bin/python -m data_pipeline.convert.synthetic", f"{HERE}::test_readme_vqa2_conversion_on_a_local_stand_in"),
    (README, "./launch.sh fetch-weights", f"{HERE}::test_readme_fetch_weights_prints_the_documented_lines"),
    (README, "./launch.sh train", f"{HERE}::test_readme_one_node_many_nodes"),
    (README, ".venv/bin/python -m pytest", f"{HERE}::test_readme_development_commands"),
    (README, ".venv/bin/ruff", f"{HERE}::test_readme_development_commands"),
    (README, ".venv/bin/python -m trainer.tools.bench", f"{HERE}::test_readme_development_commands"),
    (README, "scripts/gpu_check.sh", "test_gpu_check.py::test_help_and_bad_options"),
    (CLUSTER, "docker build", f"{HERE}::test_cluster_image_build_tag_push"),
    (CLUSTER, "docker tag", f"{HERE}::test_cluster_image_build_tag_push"),
    (CLUSTER, "docker push", f"{HERE}::test_cluster_image_build_tag_push"),
    (CLUSTER, "docker run --rm --gpus all --entrypoint python", f"{HERE}::test_cluster_image_checks"),
    (CLUSTER, "docker run --rm --gpus all vqa-align:0.1.0 test", f"{HERE}::test_cluster_image_checks"),
    (CLUSTER, "IMAGE=", f"{HERE}::test_cluster_conversion_through_the_image"),
    (CLUSTER, "CONVERT=", f"{HERE}::test_cluster_conversion_through_the_image"),
    (CLUSTER, "$CONVERT", f"{HERE}::test_cluster_conversion_through_the_image"),
    (CLUSTER, "aws s3 sync", "excepted: a download from object storage (the shards it fetches are what convert writes)"),
    (CLUSTER, "gcloud storage rsync", "excepted: a download from object storage (as aws s3 sync)"),
    (CLUSTER, "docker run --rm -v /mnt/weights:/checkpoints", f"{HERE}::test_cluster_fetch_weights_in_the_image"),
    (CLUSTER, "export VQA_", f"{HERE}::test_cluster_one_node_three_ways_train_the_same_run"),
    (CLUSTER, "docker compose -f docker/compose.yaml run --rm trainer train -- --preset vqa2-base", f"{HERE}::test_cluster_one_node_three_ways_train_the_same_run"),
    (CLUSTER, "docker run --rm --gpus all --init", f"{HERE}::test_cluster_one_node_three_ways_train_the_same_run"),
    (CLUSTER, "./launch.sh train -- --preset vqa2-base", f"{HERE}::test_cluster_one_node_three_ways_train_the_same_run"),
    (CLUSTER, "./launch.sh train --preflight", f"{HERE}::test_cluster_preflight"),
    (CLUSTER, "NODE_RANK=", f"{HERE}::test_cluster_two_nodes_with_docker_without_ssh"),
    (CLUSTER, "docker run --rm --gpus all --init --network host --shm-size 64g --ulimit memlock=-1 --ulimit stack=67108864 --stop-timeout 300 -e", f"{HERE}::test_cluster_two_nodes_with_docker_without_ssh"),
    (CLUSTER, "docker compose -f docker/compose.yaml -f docker/compose.rdma.yaml", f"{HERE}::test_cluster_rdma_compose"),
    (CLUSTER, "kubectl", f"{HERE}::test_cluster_kubernetes_indexed_job"),
    (CLUSTER, "cat > train.sbatch", f"{HERE}::test_cluster_slurm_one_task_per_node"),
    (CLUSTER, "sbatch train.sbatch", f"{HERE}::test_cluster_slurm_one_task_per_node"),
    (CLUSTER, "cat > train-tasks.sbatch", f"{HERE}::test_cluster_slurm_one_task_per_gpu"),
    (CLUSTER, "sbatch train-tasks.sbatch", f"{HERE}::test_cluster_slurm_one_task_per_gpu"),
    (CLUSTER, "cat > study.sbatch", f"{HERE}::test_cluster_study_as_a_slurm_job_array"),
    (CLUSTER, "sbatch study.sbatch", f"{HERE}::test_cluster_study_as_a_slurm_job_array"),
    (CLUSTER, "./launch.sh compare --preset demo", f"{HERE}::test_cluster_study_as_a_slurm_job_array"),
    (CLUSTER, "cat > hostfile", f"{HERE}::test_cluster_hostfile_over_ssh"),
    (CLUSTER, "./launch.sh train --hostfile hostfile", f"{HERE}::test_cluster_hostfile_over_ssh"),
    (CLUSTER, "docker compose -f docker/compose.yaml run --rm trainer train -- --preset vqa2-base --resume auto", f"{HERE}::test_cluster_resume"),
    (CLUSTER, "docker compose -f docker/compose.yaml run --rm --entrypoint python trainer -m trainer.checkpoint", f"{HERE}::test_cluster_resume"),
    (CLUSTER, "docker compose -f docker/compose.yaml run --rm trainer train -- --resume", f"{HERE}::test_cluster_resume"),
    (CLUSTER, "docker compose -f docker/compose.yaml up -d tensorboard", f"{HERE}::test_cluster_tensorboard"),
    (CLUSTER, "ssh -N -L", f"{HERE}::test_cluster_tensorboard"),
    (CLUSTER, "docker compose -f docker/compose.yaml run --rm --entrypoint python trainer -m trainer.serve.export", f"{HERE}::test_cluster_export_finds_the_run_folder"),
]  # fmt: skip


def where_exercised(c: Command) -> str | None:
    matches = [(p, w) for d, p, w in EXERCISED if d == c.doc and c.line.startswith(p)]
    return max(matches, key=lambda m: len(m[0]))[1] if matches else None


def test_every_documented_command_is_exercised_or_excepted() -> None:
    commands = shell_commands(README) + shell_commands(CLUSTER)
    assert len(commands) > 40
    unknown = [f"{c.doc}: {c.line}" for c in commands if where_exercised(c) is None]
    assert not unknown, "commands no test exercises; add them to EXERCISED:\n" + "\n".join(unknown)
    stale = [
        (d, p) for d, p, _ in EXERCISED if not any(c.doc == d and c.line.startswith(p) for c in commands)
    ]
    assert not stale, f"EXERCISED names commands the docs no longer have: {stale}"
    for _, _, where in EXERCISED:
        if where.startswith("excepted: "):
            continue
        file, _, test = where.partition("::")
        assert f"def {test}(" in (REPO / "tests" / file).read_text(), where


# -- the stand-in machine ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Site:
    root: Path
    """A checkout (launch.sh, pyproject.toml, docker/) with a set-up .venv of stand-ins; it stands for the image's
    /workspace too."""
    mnt: Path
    """Stands for /mnt: shards, runs, weights and raw downloads."""
    tmp: Path

    @property
    def log(self) -> Path:
        return self.tmp / "calls.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.tmp / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.tmp / "home"),
            "TMPDIR": str(self.tmp),
            "LC_ALL": "C",
            "STANDIN_LOG": str(self.log),
            "STANDIN_ROOT": str(self.root),
            "STANDIN_VOLUMES": str(self.tmp / "volumes"),
            "STANDIN_GPUS": "8",
            "STANDIN_RUN": "data_pipeline.convert",
            "STANDIN_SLURM_HOSTS": ",".join(HOSTS),
            "STANDIN_SLURM_NODELIST": "node[0-1]",
            **extra,
        }

    def localize(self, text: str) -> str:
        """The doc's host folders as this site's: /mnt/... and the README's RAW/ (the raw downloads)."""
        return re.sub(r"\bRAW(?=/|\s|$)", f"{self.mnt}/raw", text.replace("/mnt/", f"{self.mnt}/"))

    def sh(
        self, script: str, exits: dict[str, int] | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """SCRIPT (a doc's text, localized) run by bash -e in the checkout; the stand-ins' calls go to the log, and
        EXITS gives the exit status of a recording stand-in (by name; 0 otherwise)."""
        self.log.unlink(missing_ok=True)
        result = subprocess.run(
            ["bash", "-e", "-c", self.localize(script)],
            cwd=self.root,
            env=self.env(STANDIN_EXIT=json.dumps(exits or {}), **env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return result

    def calls(self, prog: str | None = None) -> list[dict]:
        entries = (
            [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        )
        return [e for e in entries if prog is None or e["prog"] == prog]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root, mnt, tmp = tmp_path / "checkout", tmp_path / "mnt", tmp_path / "site"
    for d in (
        root / "docker",
        tmp / "home",
        tmp / "volumes",
        *(mnt / n for n in ("shards", "runs", "weights")),
    ):
        d.mkdir(parents=True)
    for name in ("launch.sh", "pyproject.toml", "requirements.lock"):
        shutil.copy2(REPO / name, root / name)
    for name in ("Dockerfile", "compose.yaml", "compose.rdma.yaml"):
        shutil.copy2(REPO / "docker" / name, root / "docker" / name)
    venv = root / ".venv"
    doc_standins.install(venv / "bin", "python", "deepspeed", "tensorboard", "ruff")
    stamp = subprocess.run(
        ["bash", "-c", 'source "$1" && setup_stamp', "_", str(root / "launch.sh")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (venv / ".setup-stamp").write_text(stamp)  # set up: launch.sh installs nothing
    names = ("docker", "sbatch", "srun", "scontrol", "kubectl", "nvidia-smi", "pdsh", "ssh", "aws", "gcloud")
    doc_standins.install(tmp / "bin", *names)
    return Site(root, mnt, tmp)


def write_raw_vqa2(raw: Path) -> None:
    """A stand-in for the visualqa.org and cocodataset.org downloads, under the official names: train2014 (with a
    truncated JPEG and a missing image, as real downloads can have) and val2014."""
    from data_pipeline.convert import synthetic

    raw.mkdir(parents=True, exist_ok=True)
    settings = {"train2014": {"n_images": 12, "seed": 0}, "val2014": {"n_images": 6, "seed": 1, "bad": False}}
    for split, kwargs in settings.items():
        first = 100 if split == "train2014" else 500
        files = synthetic.write_vqa2(raw.parent / f"gen-{split}", split=split, first_image_id=first, **kwargs)
        files.questions.rename(raw / f"v2_OpenEnded_mscoco_{split}_questions.json")
        files.annotations.rename(raw / f"v2_mscoco_{split}_annotations.json")
        files.images.rename(raw / split)


# -- what the stand-ins recorded, through the real parsers ---------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_parse() -> Callable[[list[str]], object]:
    """DeepSpeed's own parser of its launcher's options (the pinned DeepSpeed)."""
    from deepspeed.launcher.runner import parse_args

    return parse_args


def trainer_args(call: dict, deepspeed_parse) -> object:
    """The trainer's options in a recorded deepspeed call, after DeepSpeed's parser took its own: parsed by
    trainer/main.py's parser, the preset and every --set field applied."""
    from trainer.config.config import apply_overrides
    from trainer.config.presets import get_preset
    from trainer.main import build_parser

    launch = deepspeed_parse(call["argv"])
    assert (launch.user_script, launch.module) == ("trainer/main.py", False), call["argv"]
    args = build_parser().parse_args(launch.user_args)
    apply_overrides(get_preset(args.preset or "tiny"), list(args.set))
    return args


def hostfile_lines(call: dict) -> list[str]:
    return call["hostfile"].split()


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


# -- README.md -----------------------------------------------------------------------------------------------------


def easyvqa_converted(site: Site) -> Path:
    """The demo's easy-VQA shards as already converted (the conversion: tests/test_data_convert.py)."""
    data = site.root / "data" / "easy-vqa"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        (data / split / "manifest.json").write_text("{}")
    return data


def test_readme_quick_start_runs_the_demo_and_the_tests(site: Site) -> None:
    from trainer.tools.compare.cli import build_parser

    data = easyvqa_converted(site)
    result = site.sh(block(README, "./launch.sh demo").text)
    assert_ok(result)
    compare, pytest_call = site.calls("python")
    args = build_parser().parse_args(compare["argv"][2:])
    assert compare["argv"][:2] == ["-m", "trainer.tools.compare"]
    assert (args.preset, args.val_subset, args.val_every) == ("demo", 500, 100)
    assert (args.train_data, args.val_data) == (str(data / "train"), str(data / "test"))
    assert args.run_dir == str(site.root / "runs" / "demo")
    readme = (REPO / README).read_text()
    for path in ("runs/demo/report.md", "runs/demo/val-subset-500", "--logdir runs/demo"):
        assert path in readme
    assert f"report: {site.root}/runs/demo/report.md" in result.stderr
    assert [c["argv"] for c in site.calls("ruff")] == [["format", "--check", "."], ["check", "."]]
    assert pytest_call["argv"] == ["-m", "pytest"]


def test_readme_five_seed_study(site: Site) -> None:
    from trainer.tools.compare.cli import build_parser
    from trainer.tools.compare.variants import parse_variants

    easyvqa_converted(site)
    study = block(README, "VQA_DEMO_RUN_DIR=")
    first, copy = study.commands()
    assert_ok(site.sh(first.text))
    (compare,) = site.calls("python")
    args = build_parser().parse_args(compare["argv"][2:])
    assert args.run_dir == "runs/demo-5seeds" and args.seeds == "0,1,2,3,4"
    assert [v.name for v in parse_variants(args.variants)][-1] == "clip-infonce-dot+dup-mask"
    # The copy takes the three files the comparison writes in its folder (tests/test_compare.py::
    # test_comparison_end_to_end reads them there).
    names = re.search(r"\{([^}]+)\}", copy.line).group(1).split(",")
    source = (REPO / "trainer" / "tools" / "compare" / "cli.py").read_text()
    assert all(f'root / "{name}"' in source for name in names), names
    for name in names:
        (site.root / args.run_dir).mkdir(parents=True, exist_ok=True)
        (site.root / args.run_dir / name).write_text(name)
    assert_ok(site.sh(copy.text))
    assert sorted(p.name for p in (site.root / "results" / "demo_5seeds").iterdir()) == sorted(names)


def test_readme_vqa2_conversion_on_a_local_stand_in(site: Site) -> None:
    """The README's synthetic stand-in for the downloads, then its conversion commands, as written."""
    synthetic = block(README, ".venv/bin/python -m data_pipeline.convert.synthetic").text
    result = site.sh(
        synthetic + block(README, "./launch.sh setup; PY=").text,
        STANDIN_RUN="data_pipeline.convert,data_pipeline.convert.synthetic",
    )
    assert_ok(result)
    assert [c["argv"][:3] for c in site.calls("python")] == [
        ["-m", "data_pipeline.convert.synthetic", "--out"],
        ["-m", "data_pipeline.convert", "vqa2-answers"],
        ["-m", "data_pipeline.convert", "vqa2"],
        ["-m", "data_pipeline.convert", "vqa2"],
    ]
    data = site.root / "data" / "vqa2"
    answers = json.loads((data / "answers.json").read_text())
    assert answers
    for split in ("train", "val"):
        manifest = json.loads((data / split / "manifest.json").read_text())
        assert manifest["totals"]["samples"] > 0
        assert json.loads((data / split / "answers.json").read_text()) == answers  # one vocabulary
    rejected = json.loads((data / "train" / "manifest.json").read_text())["rejected"]
    assert {r["reason"].split(":")[0] for r in rejected} >= {"undecodable image", "image missing"}
    # The training commands read what the conversion wrote.
    train = command(README, "./launch.sh train -- --preset vqa2-base").line
    assert "--train-data data/vqa2/train --val-data data/vqa2/val" in train


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """tests/test_weights.py's stand-in for the Hugging Face hub (a local folder laid out like it), holding ViLT's
    dandelin/vilt-b32-mlm and the openai CLIP weights open_clip asks for."""
    import huggingface_hub
    import open_clip.pretrained
    import test_weights

    hub = test_weights.FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    files = ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors")
    hub.add("dandelin/vilt-b32-mlm", {name: b"{}" for name in files})
    hub.add("timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": b"weights"})
    return test_weights.SNAPSHOT


def fetch(call: dict, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """A recorded `python -m trainer.modeling.weights ...` run for real, in this process; its stdout lines."""
    from trainer.modeling import weights

    assert call["argv"][:2] == ["-m", "trainer.modeling.weights"]
    capsys.readouterr()
    assert weights.main(call["argv"][2:]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


def test_readme_fetch_weights_prints_the_documented_lines(
    site: Site, fake_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.config.config import apply_overrides
    from trainer.config.presets import get_preset
    from trainer.modeling import weights

    assert_ok(site.sh(block(README, "./launch.sh fetch-weights").text))
    (call,) = site.calls("python")
    printed = fetch(call, capsys)
    documented = printed_block(README, "--set model.vilt_pretrained=")
    assert printed == [site.localize(line).replace("<revision>", fake_hub) for line in documented]
    assert (site.mnt / "weights" / "vilt" / "dandelin--vilt-b32-mlm" / "model.safetensors").is_file()
    model = apply_overrides(get_preset("vqa2-base"), [line.split(" ", 1)[1] for line in printed]).model
    weights.check_available(model)  # what the trainer checks at start
    # The other options the README names exist.
    weights.build_parser().parse_args(["--vilt", "NAME", "--clip", "hf-hub:ORG/NAME", "--clip-arch", "ARCH"])


def test_readme_one_node_many_nodes(site: Site, deepspeed_parse) -> None:
    from trainer.tools.compare.cli import build_parser

    hostfile = command(CLUSTER, "cat > hostfile").text.split("\n")[1:-1]  # its body: "HOST slots=GPUS" lines
    (site.root / "hostfile").write_text("\n".join(hostfile) + "\n")
    assert_ok(site.sh(block(README, "./launch.sh train -- --preset vqa2-base").text))
    one_node, over_ssh = site.calls("deepspeed")
    args = trainer_args(one_node, deepspeed_parse)
    assert deepspeed_parse(one_node["argv"]).num_gpus == 8  # one process per GPU of the node
    assert (args.preset, args.train_data, args.run_dir) == ("vqa2-base", "data/vqa2/train", "runs/vqa2")
    launch = deepspeed_parse(over_ssh["argv"])
    assert (launch.hostfile, launch.master_addr) == (str(site.root / "hostfile"), "10.0.0.1")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in over_ssh["ds_env_file"].split()
    assert trainer_args(over_ssh, deepspeed_parse).train_data == f"{site.mnt}/shards/train"
    # "Without ssh each node runs `./launch.sh train --no_ssh --num_nodes K --node_rank R --master_addr ADDR -- …`"
    (template,) = [s for s in inline_code(README) if s.startswith("./launch.sh train --no_ssh")]
    trainer = shlex.join(shlex.split(command(README, "./launch.sh train -- ").line)[3:])
    filled = template.replace(" K ", " 2 ").replace(" R ", " 1 ").replace("ADDR", "10.0.0.1")
    assert_ok(site.sh(filled.replace("…", trainer)))
    (node,) = site.calls("deepspeed")
    launch = deepspeed_parse(node["argv"])
    assert (launch.no_ssh, launch.node_rank, launch.master_addr) == (True, 1, "10.0.0.1")
    assert hostfile_lines(node) == ["node-0", "slots=8", "node-1", "slots=8"]
    assert trainer_args(node, deepspeed_parse).preset == "vqa2-base"
    # "`./launch.sh compare --preset vqa2-base --train-data … --val-data …` runs the paper's comparison on VQA v2"
    (compare,) = [s for s in inline_code(README) if s.startswith("./launch.sh compare")]
    data = iter(["data/vqa2/train", "data/vqa2/val"])
    assert_ok(site.sh(re.sub("…", lambda _: next(data), compare)))
    (call,) = site.calls("python")
    args = build_parser().parse_args(call["argv"][2:])
    assert (args.preset, args.train_data, args.val_data) == ("vqa2-base", "data/vqa2/train", "data/vqa2/val")


def test_readme_development_commands(site: Site) -> None:
    from _pytest.mark.expression import Expression

    from trainer.tools.bench.cli import build_parser

    dev = block(README, ".venv/bin/python -m pytest")
    runnable = [c.text for c in dev.commands() if not c.line.startswith("scripts/gpu_check.sh")]
    assert_ok(site.sh("\n".join(runnable)))
    pytest_calls = [c["argv"] for c in site.calls("python") if c["argv"][:2] == ["-m", "pytest"]]
    assert pytest_calls == [["-m", "pytest"], ["-m", "pytest", "-q", "-m", "not slow"]]
    # The marker expression selects with the markers pyproject.toml declares.
    declared = {m.split(":")[0] for m in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}  # fmt: skip
    assert {"slow", "gpu"} <= declared
    assert Expression.compile("not slow").evaluate(lambda name: name == "gpu")
    readme = (REPO / README).read_text()
    assert "Tests marked `gpu`" in readme and "-m slow" in readme
    assert [c["argv"] for c in site.calls("ruff")][-2:] == [["format", "."], ["check", "."]]
    assert (Path(sys.executable).parent / "ruff").exists()  # the dev extra's ruff, where the README calls it
    # The benchmark reads the demo's easy-VQA shards, where ./launch.sh demo converts them.
    (bench,) = [c["argv"] for c in site.calls("python") if c["argv"][:2] == ["-m", "trainer.tools.bench"]]
    args = build_parser().parse_args(bench[2:])
    assert (args.preset, args.train_data) == ("tiny", "data/easy-vqa/train")
    dry = site.sh("./launch.sh --dry-run demo")
    assert_ok(dry)
    assert f"-m data_pipeline.convert easyvqa --out {site.root}/data/easy-vqa" in dry.stdout


def inline_launch_commands() -> list[tuple[str, str]]:
    spans = []
    for doc in (README, CLUSTER):
        for span in inline_code(doc):
            for part in span.split(" && "):
                if part.startswith("./launch.sh ") and (doc, part) not in spans:
                    spans.append((doc, part))
    return spans


def test_inline_launch_sh_commands_are_accepted(site: Site, deepspeed_parse) -> None:
    """Every `./launch.sh ...` in the docs' prose, placeholders filled, accepted by launch.sh (--dry-run: it prints
    what it would run); a `train` command's trainer options parsed as the trainer parses them."""
    from trainer.main import build_parser

    (site.root / "runs" / "demo").mkdir(parents=True)
    easyvqa_converted(site)
    placeholders = {" K ": " 2 ", " R ": " 1 ", " ADDR ": " 10.0.0.1 ", "COMMAND": "train", "…": ""}
    spans = inline_launch_commands()
    assert len(spans) >= 10
    for doc, span in spans:
        filled = span
        for placeholder, value in placeholders.items():
            filled = filled.replace(placeholder, value)
        if "--dry-run" not in filled:
            filled = filled.replace("./launch.sh ", "./launch.sh --dry-run ", 1)
        result = site.sh(filled)
        assert result.returncode == 0, f"{doc}: `{span}` as `{filled}`: {result.stderr}"
        words = shlex.split(filled)
        trainer = words[words.index("--") + 1 :] if words[2] == "train" and "--" in words else []
        if trainer and "…" not in span and "--help" not in trainer:
            build_parser().parse_args(trainer)


def test_readme_export_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.serve import export

    (span,) = [s for s in inline_code(README) if s.startswith("python -m trainer.serve.export")]
    placeholders = {"RUN": str(tmp_path / "run"), "DIR": str(tmp_path / "out")}
    argv = [placeholders.get(word, word) for word in shlex.split(span)[3:]]
    # Every option the README gives is known and none it needs is missing: what stops it is export's own check of
    # the run folder (exit 2 and one line), not argparse's usage error (SystemExit).
    capsys.readouterr()
    assert export.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'run'}")


# -- docs/cluster.md -------------------------------------------------------------------------------------------------


def test_cluster_image_build_tag_push(site: Site) -> None:
    assert_ok(site.sh(block(CLUSTER, "docker build").text))
    build, tag, push = site.calls("docker")
    assert build["context"] == str(site.root) and build["tags"] == ["vqa-align:0.1.0"]
    assert tag["argv"] == ["tag", "vqa-align:0.1.0", "registry.example.com/team/vqa-align:0.1.0"]
    assert push["argv"] == ["push", "registry.example.com/team/vqa-align:0.1.0"]
    # "--build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g)": arguments the Dockerfile declares.
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for name in re.findall(r"--build-arg (\w+)=", (REPO / CLUSTER).read_text()):
        assert re.search(rf"^ARG {name}=", dockerfile, re.M), name


def test_cluster_image_checks(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert_ok(site.sh(block(CLUSTER, "docker run --rm --gpus all --entrypoint python").text))
    python, pytest_call = site.calls("python")
    assert python["argv"][0] == "-c"
    capsys.readouterr()
    exec(compile(python["argv"][1], "docs/cluster.md", "exec"), {})  # the image's check, in this interpreter
    assert re.fullmatch(r"\d+ GPUs\n", capsys.readouterr().out)
    assert pytest_call["argv"] == ["-m", "pytest"]  # `docker run IMAGE test` is ./launch.sh test


def test_cluster_conversion_through_the_image(site: Site) -> None:
    from data_pipeline.convert import cli as convert
    from data_pipeline.convert import easyvqa

    write_raw_vqa2(site.mnt / "raw")
    result = site.sh(block(CLUSTER, "CONVERT=").text)
    assert_ok(result)
    shards = site.mnt / "shards"
    assert json.loads((shards / "answers.json").read_text())
    for split in ("train", "val"):
        assert json.loads((shards / split / "manifest.json").read_text())["totals"]["samples"] > 0
    # /mnt/shards/train and /mnt/shards/val are where the compose file's trainer reads by default (/data mounted).
    env = doc_standins.service_env(
        doc_standins.compose_services([str(REPO / "docker" / "compose.yaml")])["trainer"]
    )
    assert (env["VQA_TRAIN_DATA"], env["VQA_VAL_DATA"]) == ("/data/train", "/data/val")
    # "`$CONVERT easyvqa --out /data/easyvqa` writes /mnt/shards/easyvqa/train and /mnt/shards/easyvqa/test"
    (span,) = [s for s in inline_code(CLUSTER) if s.startswith("$CONVERT easyvqa")]
    args = convert.build_parser().parse_args(shlex.split(span)[1:])
    assert [f"{args.out}/{split}" for split in easyvqa.SPLITS] == [
        "/data/easyvqa/train",
        "/data/easyvqa/test",
    ]
    assert "`/mnt/shards/easyvqa/train` and `/mnt/shards/easyvqa/test`" in (REPO / CLUSTER).read_text()


def test_cluster_fetch_weights_in_the_image(
    site: Site, fake_hub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_ok(site.sh(block(CLUSTER, "docker run --rm -v /mnt/weights:/checkpoints").text))
    (call,) = site.calls("python")
    assert call["env"]["VQA_WEIGHTS"] == f"{site.mnt}/weights/weights"  # the image's /checkpoints/weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VQA_WEIGHTS", call["env"]["VQA_WEIGHTS"])
        printed = fetch(call, capsys)
    documented = printed_block(CLUSTER, "--set model.vilt_pretrained=")
    container = [line.replace("/checkpoints/", f"{site.mnt}/weights/").replace("<revision>", fake_hub) for line in documented]  # fmt: skip
    assert printed == container
    # "Without Docker, in a checkout: ..." is the README's command.
    (span,) = [s for s in inline_code(CLUSTER) if s.startswith("./launch.sh fetch-weights --preset")]
    assert span == command(README, "./launch.sh fetch-weights").line


def compose_exports() -> str:
    """Section 3's `export VQA_...` lines, which the later compose commands of the page assume."""
    return "\n".join(c.text for c in shell_commands(CLUSTER) if c.line.startswith("export VQA_"))


def test_cluster_one_node_three_ways_train_the_same_run(site: Site, deepspeed_parse) -> None:
    by_hand = "docker run --rm --gpus all --init --network host --shm-size 64g --ulimit memlock=-1 --ulimit stack=67108864 --stop-timeout 300 -v"  # fmt: skip
    compose = docker_run = None
    runs = []
    for prefix in ("export VQA_", by_hand, "./launch.sh train -- --preset vqa2-base"):
        assert_ok(site.sh(block(CLUSTER, prefix).text))
        (call,) = site.calls("deepspeed")
        assert deepspeed_parse(call["argv"]).num_gpus == 8
        args = trainer_args(call, deepspeed_parse)
        runs.append((args.preset, args.train_data, args.val_data, args.run_dir))
        if prefix == "export VQA_":
            (compose,) = site.calls("docker")
            assert compose["definition"]["image"] == "registry.example.com/team/vqa-align:0.1.0"
        elif prefix.startswith("docker run"):
            (docker_run,) = site.calls("docker")
    shards, run_dir = site.mnt / "shards", site.mnt / "runs" / "vqa2-clip-dot"
    assert runs == [("vqa2-base", str(shards / "train"), str(shards / "val"), str(run_dir))] * 3
    # The container by hand has what the compose file gives.
    assert dict(docker_run["options"])["--shm-size"] == "64g" and "--init" in dict(docker_run["options"])
    assert docker_run["mounts"] == compose["mounts"]


def test_cluster_preflight(site: Site, deepspeed_parse) -> None:
    from trainer.tools.preflight.cli import DEFAULT_SIZES_GPU, build_parser

    assert_ok(site.sh(block(CLUSTER, "./launch.sh train --preflight").text))
    (call,) = site.calls("deepspeed")
    launch = deepspeed_parse(call["argv"])
    assert (launch.module, launch.user_script, launch.num_gpus) == (True, "trainer.tools.preflight", 8)
    args, ignored = build_parser().parse_known_args(launch.user_args)
    assert ignored == ["--preset", "vqa2-base"]  # the trainer's own options, which the preflight ignores
    assert (args.train_data, args.run_dir) == (f"{site.mnt}/shards/train", f"{site.mnt}/runs/vqa2-clip-dot")
    # The options and defaults the page names.
    text = " ".join((REPO / CLUSTER).read_text().split())
    sizes = re.search(r"`--sizes ([^`]+)`, the default on GPUs", text).group(1).split()
    assert tuple(sizes) == DEFAULT_SIZES_GPU
    named = ["--sizes", *sizes, "--require-gpu", "--min-free-fraction", "0.5", "--timeout", "300"]
    args = build_parser().parse_args(named)
    assert args.require_gpu and build_parser().parse_args([]).min_free_fraction == 0.5
    assert (
        "(default: half)" in text
        and "(default 300 s)" in text
        and build_parser().parse_args([]).timeout == 300
    )


def test_cluster_two_nodes_with_docker_without_ssh(site: Site, deepspeed_parse) -> None:
    two_nodes = block(CLUSTER, "NODE_RANK=")
    for rank in (0, 1):
        script = "\n".join(c.text for c in two_nodes.commands() if c.line != f"NODE_RANK={1 - rank}")
        assert_ok(site.sh(script))
        (call,) = site.calls("deepspeed")
        launch = deepspeed_parse(call["argv"])
        assert (launch.no_ssh, launch.node_rank, launch.master_addr, launch.master_port) == (
            True,
            rank,
            "10.0.0.1",
            29500,
        )
        assert hostfile_lines(call) == ["node-0", "slots=8", "node-1", "slots=8"]  # 2 x 8 ranks
        assert call["env"]["NCCL_SOCKET_IFNAME"] == "eth0"  # -e reaches every rank
        args = trainer_args(call, deepspeed_parse)
        assert args.run_dir == f"{site.mnt}/runs/vqa2-clip-dot"


def test_cluster_rdma_compose(site: Site, deepspeed_parse) -> None:
    rdma = command(CLUSTER, "docker compose -f docker/compose.yaml -f docker/compose.rdma.yaml").text
    assert_ok(site.sh(compose_exports() + "\n" + rdma))
    (compose,) = site.calls("docker")
    assert "/dev/infiniband:/dev/infiniband" in compose["definition"]["devices"]
    assert "IPC_LOCK" in compose["definition"]["cap_add"]
    (call,) = site.calls("deepspeed")
    assert trainer_args(call, deepspeed_parse).run_dir == f"{site.mnt}/runs/vqa2-clip-dot"


def expand_k8s(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_cluster_kubernetes_indexed_job(site: Site, deepspeed_parse) -> None:
    assert_ok(site.sh(block(CLUSTER, "kubectl apply").text))
    apply, logs = site.calls("kubectl")
    service, job = yaml.safe_load_all(apply["manifest"])
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert logs["argv"] == ["logs", "-f", f"job/{job['metadata']['name']}"]
    # pod 0 is reachable by name: a headless Service named as the pods' subdomain, selecting the Job's pods.
    assert (service["spec"]["clusterIP"], service["metadata"]["name"]) == ("None", pod["subdomain"])
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            mounts[mount["mountPath"]] = str(
                site.tmp / "claims" / volume["persistentVolumeClaim"]["claimName"]
            )
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["shm"] == "/dev/shm"
    for index in range(spec["completions"]):
        env = {e["name"]: e["value"] for e in container["env"]} | {"JOB_COMPLETION_INDEX": str(index)}
        site.log.unlink(missing_ok=True)
        args = [expand_k8s(str(a), env) for a in container["args"]]
        status = doc_standins.run_image(args, env=env, mounts=mounts, base_env=site.env())
        assert status == 0
        (call,) = site.calls("deepspeed")
        launch = deepspeed_parse(call["argv"])
        assert (launch.no_ssh, launch.node_rank) == (True, index)
        assert launch.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"
        assert (
            hostfile_lines(call)[1::2] == [f"slots={container['resources']['limits']['nvidia.com/gpu']}"] * 2
        )
        args = trainer_args(call, deepspeed_parse)
        assert args.resume == "auto" and args.run_dir == f"{site.tmp}/claims/vqa-runs/vqa2-clip-dot"
        assert call["env"]["NCCL_DEBUG"] == "WARN"


@pytest.mark.parametrize(("trainer_exit", "requeued"), [(143, True), (0, False), (1, False)])
def test_cluster_slurm_one_task_per_node(
    site: Site, deepspeed_parse, trainer_exit: int, requeued: bool
) -> None:
    """The batch script runs (a stand-in sbatch runs it here, srun starts one task per node), each task's launch.sh
    starts its node; a job stopped by --signal (exit 143) requeues itself, any other exit does not."""
    result = site.sh(block(CLUSTER, "cat > train.sbatch").text, exits={"deepspeed": trainer_exit})
    assert_ok(result)
    (job,) = site.calls("sbatch")
    assert job["job_status"] == trainer_exit
    for option in ("--requeue", "--signal", "--open-mode", "--nodes", "--ntasks-per-node"):
        assert option in job["options"], option
    assert job["options"]["--signal"] == "TERM@300" and job["options"]["--ntasks-per-node"] == "1"
    calls = site.calls("deepspeed")
    assert len(calls) == 2  # one node each
    for rank, call in enumerate(calls):
        launch = deepspeed_parse(call["argv"])
        assert (launch.no_ssh, launch.node_rank, launch.master_addr) == (True, rank, HOSTS[0])
        assert trainer_args(call, deepspeed_parse).resume == "auto"
    requeues = [c["argv"] for c in site.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == ([["requeue", "4242"]] if requeued else [])
    # With pyxis: /workspace/launch.sh is the image's entry point, and the mounts are the compose file's.
    text = (REPO / CLUSTER).read_text()
    assert 'ENTRYPOINT ["/workspace/launch.sh"]' in (REPO / "docker" / "Dockerfile").read_text()
    mounts = re.search(r"--container-mounts=([^`]+)`", text).group(1).split(",")
    compose = doc_standins.compose_services([str(REPO / "docker" / "compose.yaml")])["trainer"]["volumes"]
    assert sorted(m.split(":")[1] for m in mounts) == sorted(v.split(":")[1] for v in compose)


def test_cluster_slurm_one_task_per_gpu(site: Site) -> None:
    from trainer.engine import dist
    from trainer.main import build_parser

    result = site.sh(block(CLUSTER, "cat > train-tasks.sbatch").text, exits={"python": 143})
    assert_ok(result)
    (job,) = site.calls("sbatch")
    assert job["job_status"] == 143
    assert [c["argv"] for c in site.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", "4242"]]
    tasks = site.calls("python")
    per_node = int(job["options"]["--ntasks-per-node"])
    assert len(tasks) == int(job["options"]["--nodes"]) * per_node
    for rank, task in enumerate(tasks):
        assert task["argv"][0] == "trainer/main.py" and (REPO / task["argv"][0]).is_file()
        args = build_parser().parse_args(task["argv"][1:])
        assert (args.preset, args.resume) == ("vqa2-base", "auto")
        launch = dist.world_info_from_env(task["env"])
        assert (launch.launcher, launch.rank, launch.world_size) == ("slurm", rank, len(tasks))
        assert (launch.local_rank, launch.local_world_size) == (rank % per_node, per_node)
        assert dist.rendezvous(launch, task["env"]) == (HOSTS[0], "29500")
        assert task["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("cell_exit", [0, 143])
def test_cluster_study_as_a_slurm_job_array(site: Site, cell_exit: int) -> None:
    """The array runs every (variant, seed) cell of the study once, each through launch.sh with --only and its seed,
    all in one run folder; a cell stopped before the time limit (143) requeues its own task; the report command
    gathers the same study."""
    from trainer.tools.compare.cli import build_parser
    from trainer.tools.compare.variants import parse_variants

    for split in ("train", "test"):
        (site.mnt / "shards" / "easyvqa" / split).mkdir(parents=True)
        (site.mnt / "shards" / "easyvqa" / split / "manifest.json").write_text("{}")
    result = site.sh(block(CLUSTER, "cat > study.sbatch").text, exits={"python": cell_exit})
    assert_ok(result)
    (job,) = site.calls("sbatch")
    assert job["job_status"] == cell_exit and job["options"]["--signal"] == "TERM@120"
    cells = [build_parser().parse_args(c["argv"][2:]) for c in site.calls("python")]
    assert all(c["argv"][:2] == ["-m", "trainer.tools.compare"] for c in site.calls("python"))
    variants = [v.name for v in parse_variants(cells[0].variants)]
    assert len(variants) == 5 and len(cells) == int(job["options"]["--array"].split("-")[1]) + 1
    assert sorted((a.only, a.seeds) for a in cells) == sorted((v, str(s)) for v in variants for s in range(5))
    assert {(a.variants, a.run_dir, a.preset, a.val_subset, a.report_only) for a in cells} == {
        (cells[0].variants, f"{site.mnt}/runs/demo-5seeds", "demo", 500, False)
    }
    requeued = [c["argv"] for c in site.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeued == ([["requeue", f"4242_{i}"] for i in range(25)] if cell_exit == 143 else [])

    assert_ok(site.sh(block(CLUSTER, "./launch.sh compare --preset demo").text))
    (report,) = site.calls("python")
    args = build_parser().parse_args(report["argv"][2:])
    assert args.report_only and args.only is None and args.seeds == "0,1,2,3,4"
    assert (args.variants, args.run_dir, args.val_subset, args.val_every) == (
        cells[0].variants,
        cells[0].run_dir,
        cells[0].val_subset,
        cells[0].val_every,
    )


def test_cluster_hostfile_over_ssh(site: Site, deepspeed_parse) -> None:
    over_ssh = block(CLUSTER, "cat > hostfile")
    assert_ok(site.sh(over_ssh.text))
    (call,) = site.calls("deepspeed")
    launch = deepspeed_parse(call["argv"])
    assert (launch.hostfile, launch.master_addr, launch.master_port) == (
        str(site.root / "hostfile"),
        "10.0.0.1",
        29500,
    )
    assert call["hostfile"] == over_ssh.commands()[0].text.split("\n", 1)[1].rsplit("EOF", 1)[0]
    env_file = call["ds_env_file"].split()  # what DeepSpeed exports on every node
    assert {"NCCL_DEBUG=WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1"} <= set(env_file)
    assert trainer_args(call, deepspeed_parse).run_dir == f"{site.mnt}/runs/vqa2-clip-dot"


def test_cluster_resume(site: Site, deepspeed_parse, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.checkpoint import universal as checkpoint_universal
    from trainer.checkpoint.layout import UNIVERSAL_SUFFIX, tag_for_step

    auto = command(CLUSTER, "docker compose -f docker/compose.yaml run --rm trainer train -- --preset vqa2-base --resume auto")  # fmt: skip
    assert_ok(site.sh(compose_exports() + "\n" + auto.text))
    (call,) = site.calls("deepspeed")
    args = trainer_args(call, deepspeed_parse)
    run_dir = f"{site.mnt}/runs/vqa2-clip-dot"
    assert (args.resume, args.run_dir) == ("auto", run_dir)
    # Another number of GPUs: the conversion looks in the run folder the trainer writes, and the trainer resumes
    # from the tag it prints.
    universal = block(CLUSTER, "docker compose -f docker/compose.yaml run --rm --entrypoint python trainer -m trainer.checkpoint")  # fmt: skip
    assert_ok(site.sh(compose_exports() + "\n" + universal.text))
    (convert,) = site.calls("python")
    assert convert["argv"][:3] == ["-m", "trainer.checkpoint", "to-universal"]
    capsys.readouterr()
    assert (
        checkpoint_universal.main(convert["argv"][2:]) == 2
    )  # no checkpoint there yet: its own one-line refusal
    assert capsys.readouterr().err == f"error: no complete checkpoint in {run_dir}/checkpoints\n"
    (resume,) = site.calls("deepspeed")
    args = trainer_args(resume, deepspeed_parse)
    assert args.resume == tag_for_step(1000) + UNIVERSAL_SUFFIX and args.run_dir == run_dir


def test_cluster_tensorboard(site: Site) -> None:
    tensorboard = block(CLUSTER, "docker compose -f docker/compose.yaml up -d tensorboard")
    up, tunnel = tensorboard.commands()
    assert_ok(site.sh(compose_exports() + "\n" + up.text))
    (compose,) = site.calls("docker")
    (served,) = site.calls("tensorboard")
    assert served["argv"][:2] == ["--logdir", f"{site.mnt}/runs"]  # the runs volume the trainer writes
    (published,) = compose["definition"]["ports"]
    assert shlex.split(tunnel.line)[3] == f"6006:{published.rsplit(':', 1)[0]}"  # the tunnel reaches it
    # "set VQA_TENSORBOARD_BIND=10.0.0.1 before docker compose up"
    assert_ok(site.sh(compose_exports() + "\n" + up.text, VQA_TENSORBOARD_BIND="10.0.0.1"))
    assert site.calls("docker")[0]["definition"]["ports"] == ["10.0.0.1:6006:6006"]


def test_cluster_export_finds_the_run_folder(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.serve import export

    assert_ok(site.sh(compose_exports() + "\n" + block(CLUSTER, "docker compose -f docker/compose.yaml run --rm --entrypoint python trainer -m trainer.serve.export").text))  # fmt: skip
    (call,) = site.calls("python")
    assert call["argv"][:2] == ["-m", "trainer.serve.export"]
    capsys.readouterr()
    assert (
        export.main(call["argv"][2:]) == 2
    )  # no checkpoint there yet: export's own refusal, not a usage error
    assert f"{site.mnt}/runs/vqa2-clip-dot" in capsys.readouterr().err


@pytest.mark.slow
def test_cluster_export_commands_export_a_run(
    site: Site, tiny_easyvqa_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both export commands of section 8 on a real (tiny, 2-step) run in the run folder the page uses."""
    from trainer.main import main
    from trainer.serve import exported

    run_dir = site.mnt / "runs" / "vqa2-clip-dot"
    tiny = ["--preset", "tiny", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8"]
    tiny += ["--set", "train.progress_bar=false", "--set", "data.num_workers=1"]
    train = ["--train-data", str(tiny_easyvqa_shards / "train"), "--run-dir", str(run_dir)]
    assert main([*tiny, *train, "--max-steps", "2", "--set", "train.ckpt_every=2"]) == 0
    in_image = block(CLUSTER, "docker compose -f docker/compose.yaml run --rm --entrypoint python trainer -m trainer.serve.export")  # fmt: skip
    result = site.sh(compose_exports() + "\n" + in_image.text, STANDIN_RUN="trainer.serve.export")
    assert_ok(result)
    (call,) = site.calls("python")
    out = Path(call["argv"][call["argv"].index("--out") + 1])
    assert out.parent == site.mnt / "weights"  # the weights volume, /checkpoints in the container
    (span,) = [s for s in inline_code(CLUSTER) if s.startswith(".venv/bin/python -m trainer.serve.export")]
    assert_ok(site.sh(span, STANDIN_RUN="trainer.serve.export"))
    local = Path(site.localize(shlex.split(span)[-1]))
    for folder in (out, local):
        task, _, answers, _ = exported.from_pretrained(folder)
        assert answers and task is not None


def test_cluster_dry_run_prints_without_running(site: Site) -> None:
    """ "Every `./launch.sh` command below also works with `--dry-run` first": each training command of the page
    (section 3 and 4, without Docker), dry-run, runs nothing and prints the launcher's command."""
    for prefix in (
        "./launch.sh train -- --preset",
        "./launch.sh train --preflight",
        "./launch.sh train --hostfile",
    ):
        text = command(CLUSTER, prefix).text.replace("./launch.sh ", "./launch.sh --dry-run ", 1)
        (site.root / "hostfile").write_text("node0 slots=8\nnode1 slots=8\n")
        result = site.sh(text)
        assert_ok(result)
        assert site.calls("deepspeed") == []
        assert f"{site.root}/.venv/bin/deepspeed " in result.stdout.splitlines()[-1]
