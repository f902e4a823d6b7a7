"""The config tree: sources, precedence, and one clear line per problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, to_yaml
from daemon.run.catalog import load_config
from tests.conftest import ROOT


def problems(*sets: str, path: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, sets, environ=env or {}, world_size=1)
    return info.value.problems


class TestPrecedence:
    """File < environment < --set, later wins."""

    def test_defaults_match_the_contract(self) -> None:
        cfg = load_config(sets=["train.task=twotower"], environ={})
        t = cfg.train
        assert (t.batch_size, t.effective_batch_size, t.inner_steps_per_outer) == (256, 256, 500)
        assert cfg.mining.enabled and cfg.embeddings.enabled
        assert cfg.mining.qbatch == 2048 and cfg.mining.ttl == 5 and cfg.mining.prefetch == 3
        assert (cfg.mining.cos_min, cfg.mining.cos_max, cfg.mining.start_epoch) == (0.84, 0.96, 6)
        assert cfg.upload.min_inner_step == 50 and cfg.upload.every_inner_steps == 3
        assert cfg.api.port == 9108 and cfg.api.host == "127.0.0.1" and cfg.api.token is None
        assert cfg.watchdog.stall_seconds == 600 and cfg.shutdown.deadline_seconds == 30
        assert cfg.paths.state_dir == "./var"

    def test_the_default_job_is_the_language_model(self) -> None:
        cfg = load_config(environ={})
        assert cfg.train.task == "causal_lm" and cfg.lm.preset == "tiny" and cfg.lm.vocab_size == 8192
        assert cfg.lm.corpus == [] and not cfg.mining.enabled and not cfg.embeddings.enabled
        # The task's own defaults: batches of sequences, not of 256 documents.
        assert (cfg.train.batch_size, cfg.train.effective_batch_size, cfg.train.lr) == (16, 16, 3e-3)

    def test_a_set_key_beats_the_task_default(self) -> None:
        cfg = load_config(sets=["train.batch_size=4", "train.effective_batch_size=8"], environ={})
        assert (cfg.train.batch_size, cfg.train.effective_batch_size) == (4, 8)
        cfg = load_config(sets=["train.task=twotower", "mining.enabled=false"], environ={})
        assert not cfg.mining.enabled and cfg.embeddings.enabled

    def test_file_then_env_then_set(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text("train:\n  lr: 0.1\n  seed: 1\n  epochs: 4\n")
        env = {"MINERD_TRAIN__SEED": "2", "MINERD_TRAIN__EPOCHS": "5"}
        cfg = load_config(str(f), ["train.epochs=6"], environ=env)
        assert (cfg.train.lr, cfg.train.seed, cfg.train.epochs) == (0.1, 2, 6)

    def test_env_values_are_typed(self) -> None:
        cfg = load_config(environ={"MINERD_MINING__ENABLED": "false", "MINERD_API__PORT": "9200"})
        assert cfg.mining.enabled is False and cfg.api.port == 9200


class TestProblems:
    """Each bad input gives `config error: <key.path>: <what> (got <value>)`."""

    def test_unknown_key_suggests(self) -> None:
        assert problems("train.batch_sise=3") == [
            "config error: train.batch_sise: unknown key; did you mean 'train.batch_size'? (got 3)"
        ]

    def test_unknown_section(self) -> None:
        (line,) = problems("trian.lr=3")
        assert line.startswith("config error: trian: unknown key; did you mean 'train'?")

    def test_wrong_type(self) -> None:
        (line,) = problems("train.batch_size=abc")
        assert line.startswith("config error: train.batch_size: ") and line.endswith("(got 'abc')")

    def test_out_of_range(self) -> None:
        (line,) = problems("train.max_steps=-3")
        assert line == "config error: train.max_steps: input should be greater than or equal to 0 (got -3)"

    def test_effective_batch_not_divisible(self) -> None:
        (line,) = problems("train.task=twotower", "train.batch_size=100")
        assert "train.effective_batch_size: must be a multiple of train.batch_size x world size" in line
        assert line.endswith("(got 256)")

    def test_world_size_counts(self) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(sets=["train.batch_size=128"], environ={}, world_size=4)
        assert "(128 x 4 = 512)" in info.value.problems[0]

    def test_cosine_window(self) -> None:
        (line,) = problems("mining.cos_min=0.97")
        assert line == "config error: mining.cos_min: must be below mining.cos_max (0.96) (got 0.97)"

    def test_hardneg_frac(self) -> None:
        (line,) = problems("mining.hardneg_frac=1.5")
        assert line.startswith("config error: mining.hardneg_frac:") and line.endswith("(got 1.5)")

    def test_several_problems_one_line_each(self) -> None:
        lines = problems("train.batch_size=abc", "train.max_steps=-1", "api.port=70000")
        assert len(lines) == 3 and all(x.startswith("config error: ") for x in lines)

    def test_missing_file(self, tmp_path: Path) -> None:
        (line,) = problems(path=str(tmp_path / "nope.yaml"))
        assert line.startswith("config error: --config: file not found")

    def test_unreadable_file(self, tmp_path: Path) -> None:
        d = tmp_path / "adir.yaml"
        d.mkdir()
        (line,) = problems(path=str(d))
        assert line.startswith("config error: --config: not a regular file")

    def test_malformed_yaml_has_line_number(self, tmp_path: Path) -> None:
        f = tmp_path / "bad.yaml"
        f.write_text("train:\n  lr: 0.1\n  seed: [1, 2\n")
        (line,) = problems(path=str(f))
        assert line.startswith(f"config error: {f}:4: malformed YAML")

    def test_secret_is_masked(self) -> None:
        cfg = load_config(sets=["api.token=hunter2"], environ={})
        out = to_yaml(cfg)
        assert "hunter2" not in out and "********" in out
        assert cfg.api.token is not None and cfg.api.token.get_secret_value() == "hunter2"


class TestCli:
    """The CLI exits 2 with one line per problem, no traceback, nothing written."""

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)

    def test_validate_bad(self, tmp_path: Path) -> None:
        state = tmp_path / "state"
        r = self.run("run", "--set", f"paths.state_dir={state}", "--set", "train.batch_sise=1", cwd=tmp_path)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            "config error: train.batch_sise: unknown key; did you mean 'train.batch_size'? (got 1)"
        ]
        assert "Traceback" not in r.stderr + r.stdout
        assert not state.exists()

    def test_validate_good_and_show(self, tmp_path: Path) -> None:
        assert self.run("config", "validate", cwd=tmp_path).returncode == 0
        r = self.run("config", "show", "--set", "api.token=s3cret", cwd=tmp_path)
        assert r.returncode == 0 and "s3cret" not in r.stdout
        assert "batch_size: 16" in r.stdout and "task: causal_lm" in r.stdout

    def test_usage_error_is_one_line(self, tmp_path: Path) -> None:
        r = self.run("run", "--no-such-flag", cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

    @pytest.mark.parametrize(
        "args",
        [("status", "--url", "not a url"), ("status", "--url", "http://bad host"),
         ("status", "--url", "ftp://127.0.0.1:21"), ("bundle", "--url", "http://bad host")],
    )
    def test_a_bad_url_is_one_line_and_exit_2(self, tmp_path: Path, args: tuple[str, ...]) -> None:
        r = self.run(*args, "--out" if args[0] == "bundle" else "--json", *(["b.md"] if args[0] == "bundle" else []),
                     cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and "--url" in r.stderr
        assert not (tmp_path / "b.md").exists()

    @pytest.mark.parametrize(("task", "model_class"), [("causal_lm", "LlamaForCausalLM"),
                                                       ("twotower", "TwoTowerModel")])
    def test_diagnose_builds_the_configured_tasks_model(self, tmp_path: Path, task: str, model_class: str) -> None:
        r = self.run("diagnose", "--json", "--set", f"train.task={task}", "--set", f"paths.state_dir={tmp_path / 's'}",
                     cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        diag = json.loads(r.stdout)
        assert diag["model_class"] == model_class and diag["model_parameters"] > 0
        assert not (tmp_path / "s").exists()  # diagnose writes nothing


class TestHostileInput:
    """Values that used to pass validation and fail later, or to leak or blow up, are refused
    at `config validate` with one bounded line, and secrets never echo."""

    @pytest.mark.parametrize("token", ["ab #cd", "#x", "&x", "null", "~", "123456", "  spaced  ", "a: b"])
    def test_string_and_secret_values_are_taken_raw(self, token: str) -> None:
        from_set = load_config(sets=[f"api.token={token}"], environ={})
        from_env = load_config(environ={"MINERD_API__TOKEN": token})
        assert from_set.api.token is not None and from_env.api.token is not None
        assert from_set.api.token.get_secret_value() == token == from_env.api.token.get_secret_value()
        assert load_config(sets=[f"paths.state_dir={token}"], environ={}).paths.state_dir == token

    def test_other_values_are_still_typed(self) -> None:
        cfg = load_config(sets=["train.max_steps=5", "mining.enabled=true", "train.amp=off", "train.task=twotower"],
                          environ={})
        assert cfg.train.max_steps == 5 and cfg.mining.enabled is True and cfg.train.amp == "off"

    def test_a_mistyped_secret_key_does_not_echo_its_value(self) -> None:
        (line,) = problems("api.tokn=SECRET-VALUE")
        assert "SECRET-VALUE" not in line and "did you mean 'api.token'?" in line
        (line,) = problems("upload.aws_secret=xyz")
        assert "xyz" not in line

    def test_a_password_in_the_endpoint_is_masked(self) -> None:
        cfg = load_config(sets=["upload.backend=s3", "upload.target=s3://b/p",
                                "upload.endpoint_url=https://user:pa/ss@minio.local:9000"], environ={})
        shown = to_yaml(cfg)
        assert "pa/ss" not in shown and "user:********@minio.local:9000" in shown

    def test_yaml_aliases_are_refused_and_lines_are_bounded(self, tmp_path: Path) -> None:
        bomb = tmp_path / "bomb.yaml"
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
            lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
        bomb.write_text("\n".join(lines) + "\n")
        assert len(bomb.read_bytes()) < 1000
        (line,) = problems(path=str(bomb))
        assert line == f"config error: {bomb}:2: malformed YAML: aliases (*name) are not allowed in a minerd config"
        (line,) = problems(f"train.device={'x' * 100_000}")
        assert len(line) < 300 and "(100002 characters)" in line

    @pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "."])
    def test_the_config_must_be_a_regular_file(self, path: str) -> None:
        assert problems(path=path) == [f"config error: --config: not a regular file (got '{path}')"]

    def test_an_oversized_config_file(self, tmp_path: Path) -> None:
        big = tmp_path / "big.yaml"
        big.write_text("# " + "x" * (2 << 20) + "\n")
        (line,) = problems(path=str(big))
        assert "larger than 1048576 bytes" in line

    @pytest.mark.parametrize(
        ("setting", "expected"),
        [
            ("train.seed=-1", "train.seed: input should be greater than or equal to 0"),
            ("train.seed=18446744073709551616", "train.seed: input should be less than or equal to 4294967295"),
            ("shutdown.deadline_seconds=.inf", "shutdown.deadline_seconds: input should be a finite number"),
            ("watchdog.stall_seconds=.nan", "watchdog.stall_seconds: input should be a finite number"),
            ("shutdown.deadline_seconds=1e300", "shutdown.deadline_seconds: input should be less than or equal to"),
            ("api.host=bad host", "api.host: must be an IP address or a host name"),
            ("upload.target=s3://bucket/prefix", "upload.target: is a URL: set upload.backend=s3 for it"),
            ("upload.artifact=gradients", "upload.artifact: input should be 'weights', 'pseudo_gradient' or 'both'"),
            ("upload.compression=zstd", "upload.compression: input should be 'none', 'topk' or 'dct_topk'"),
            ("compression.keep=0", "compression.keep: input should be greater than 0"),
            ("compression.block=1", "compression.block: input should be greater than or equal to 2"),
        ],
    )
    def test_values_that_would_fail_at_run_time(self, setting: str, expected: str) -> None:
        (line,) = problems(setting)
        assert line.startswith(f"config error: {expected}"), line

    @pytest.mark.parametrize(("setting", "expected"), [
        ("ft.lighthouse=", "config error: ft.lighthouse: is required with ft.enabled"),
        ("ft.lighthouse=not a url", "config error: ft.lighthouse: must be http://host:port"),
        ("ft.quorum_timeout_seconds=900", "config error: ft.quorum_timeout_seconds: must be under "
                                          "watchdog.stall_seconds (600)"),
        ("ft.host=bad host", "config error: ft.host: must be an IP address or a host name"),
    ])
    def test_fault_tolerance_settings(self, setting: str, expected: str) -> None:
        (line,) = problems("ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510", setting)
        assert line.startswith(expected), line

    @pytest.mark.parametrize("sync", ["ddp", "diloco"])
    def test_fault_tolerance_under_torchrun(self, sync: str) -> None:
        # A torchrun job is one replica group: DDP or DiLoCo inside it, torchft's DiLoCo across groups.
        cfg = load_config(None, ["ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510",
                                 "train.effective_batch_size=32", f"train.sync={sync}"], environ={}, world_size=2)
        assert cfg.ft.enabled and cfg.train.sync == sync

    def test_outer_compression_needs_diloco(self) -> None:
        (line,) = problems("train.sync=ddp", "train.outer_compression=dct_topk")
        assert line == ("config error: train.outer_compression: compresses DiLoCo's outer sync; needs "
                        "train.sync=diloco (got 'ddp') (got 'dct_topk')"), line

    @pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "0.0.0.0", "localhost", "miner-1.example.org"])
    def test_good_hosts(self, host: str) -> None:
        assert load_config(sets=[f"api.host={host}"], environ={}).api.host == host

    def test_the_token_from_a_file(self, tmp_path: Path) -> None:
        f = tmp_path / "api-token"
        f.write_text("s3cret #with &odd ~chars\n")
        cfg = load_config(sets=[f"api.token_file={f}"], environ={})
        assert cfg.api.token is not None and cfg.api.token.get_secret_value() == "s3cret #with &odd ~chars"
        assert "s3cret" not in to_yaml(cfg)
        assert load_config(sets=[f"api.token_file={tmp_path / 'absent'}"], environ={}).api.token is None
        (line,) = problems(f"api.token_file={f}", "api.token=x")
        assert "set api.token or api.token_file, not both" in line
        (line,) = problems(f"api.token_file={tmp_path}")
        assert "must be a regular file" in line

    def test_the_s3_target_never_shows_the_endpoint_password(self) -> None:
        from daemon.upload.storage import S3Storage

        storage = S3Storage("s3://bucket/prefix", "https://user:pa@ss/word@127.0.0.1:9",
                            environ={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
        # describe() is what UPLOAD lines, /status and the bundle show.
        assert storage.describe() == "s3://bucket/prefix at https://user:********@127.0.0.1:9"
        err = storage._wrap("put x", OSError(f"could not connect to {storage.endpoint_url}"))
        assert "pa@ss" not in str(err) and "********" in str(err)
