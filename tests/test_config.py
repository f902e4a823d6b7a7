"""The config tree: sources, precedence, and one clear line per problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, to_yaml
from daemon.run.catalog import load_config
from tests.conftest import ROOT, cli


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

    def test_validate_bad(self, tmp_path: Path) -> None:
        state = tmp_path / "state"
        code, out, err = cli("run", "--set", f"paths.state_dir={state}", "--set", "train.batch_sise=1")
        assert code == 2
        assert err.strip().splitlines() == [
            "config error: train.batch_sise: unknown key; did you mean 'train.batch_size'? (got 1)"
        ]
        assert "Traceback" not in err + out
        assert not state.exists()

    def test_validate_good_and_show(self, tmp_path: Path) -> None:
        assert cli("config", "validate")[0] == 0
        code, out, _ = cli("config", "show", "--set", "api.token=s3cret")
        assert code == 0 and "s3cret" not in out
        assert "batch_size: 16" in out and "task: causal_lm" in out

    def test_usage_error_is_one_line(self, tmp_path: Path) -> None:
        code, _, err = cli("run", "--no-such-flag")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    @pytest.mark.parametrize(
        "args",
        [("status", "--url", "not a url"), ("status", "--url", "http://bad host"),
         ("status", "--url", "ftp://127.0.0.1:21"), ("bundle", "--url", "http://bad host")],
    )
    def test_a_bad_url_is_one_line_and_exit_2(self, tmp_path: Path, args: tuple[str, ...]) -> None:
        out_file = tmp_path / "b.md"
        code, _, err = cli(*args, "--out" if args[0] == "bundle" else "--json",
                           *([str(out_file)] if args[0] == "bundle" else []))
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and "--url" in err
        assert not out_file.exists()

    @pytest.mark.parametrize(("task", "model_class"), [("causal_lm", "LlamaForCausalLM"),
                                                       ("twotower", "TwoTowerModel")])
    def test_diagnose_builds_the_configured_tasks_model(self, tmp_path: Path, task: str, model_class: str) -> None:
        code, out, err = cli("diagnose", "--json", "--set", f"train.task={task}",
                             "--set", f"paths.state_dir={tmp_path / 's'}")
        assert code == 0, err[-2000:]
        diag = json.loads(out)
        assert diag["model_class"] == model_class and diag["model_parameters"] > 0
        assert not (tmp_path / "s").exists()  # diagnose writes nothing


@pytest.mark.integration
class TestCliProcess:
    """`python -m daemon` in a bare environment: one line and exit 2 for a bad key, no traceback."""

    def test_bad_key(self, tmp_path: Path) -> None:
        state = tmp_path / "state"
        r = subprocess.run([sys.executable, "-m", "daemon", "run", "--set", f"paths.state_dir={state}", "--set",
                            "train.batch_sise=1"], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
        assert r.stderr.strip().splitlines() == [
            "config error: train.batch_sise: unknown key; did you mean 'train.batch_size'? (got 1)"]
        assert not state.exists()


class TestMovedKeys:
    """The two-tower keys that moved to their task's section are read at their old names for one
    release, with one DEPRECATED line each."""

    NOTE = "DEPRECATED: config key {old} is now {new}; the old name is read until the next release"

    def test_every_source(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text("train:\n  task: twotower\n  hidden_dim: 64\ndata:\n  num_docs: 1000\n")
        cfg = load_config(str(f), ["train.embed_dim=16"], environ={"MINERD_DATA__DIM": "8"})
        t = cfg.twotower
        assert (t.hidden_dim, t.num_docs, t.embed_dim, t.dim) == (64, 1000, 16, 8)
        assert cfg.deprecations == [
            self.NOTE.format(old="train.hidden_dim", new="twotower.hidden_dim"),
            self.NOTE.format(old="data.num_docs", new="twotower.num_docs"),
            self.NOTE.format(old="data.dim", new="twotower.dim"),
            self.NOTE.format(old="train.embed_dim", new="twotower.embed_dim"),
        ]
        assert "data" not in cfg.public_dict() and "hidden_dim" not in cfg.public_dict()["train"]

    def test_the_new_name_in_a_later_source_wins(self, tmp_path: Path) -> None:
        f = tmp_path / "c.yaml"
        f.write_text("data:\n  num_docs: 1000\n")
        cfg = load_config(str(f), ["twotower.num_docs=3000", "train.task=twotower"], environ={})
        assert cfg.twotower.num_docs == 3000 and len(cfg.deprecations) == 1

    def test_both_names_in_one_source(self) -> None:
        assert problems("train.task=twotower", "data.seed=1", "twotower.seed=2") == [
            "config error: data.seed: is the old name of twotower.seed, which --set sets too; keep twotower.seed "
            "(got '1')"]

    def test_the_cli_says_it_once(self) -> None:
        code, out, err = cli("config", "validate", "--set", "train.task=twotower", "--set", "train.temperature=0.1")
        assert code == 0 and out.strip() == "config ok"
        assert err.strip().splitlines() == [self.NOTE.format(old="train.temperature", new="twotower.temperature")]


class TestTrainingDigest:
    """Replica groups compare the keys each section says they must agree on, and no others."""

    BASE = ("train.task=twotower",)

    def digest(self, *sets: str) -> str:
        return load_config(sets=[*self.BASE, *sets], environ={}).training_digest()

    @pytest.mark.parametrize("setting", ["twotower.hidden_dim=64", "twotower.seed=3", "train.lr=0.01",
                                         "compression.keep=0.25", "embeddings.enabled=false", "ft.min_replicas=2",
                                         "lm.seq_len=128", "train.sync=ddp"])
    def test_what_must_agree(self, setting: str) -> None:
        assert self.digest(setting) != self.digest()

    @pytest.mark.parametrize("setting", ["train.device=cpu", "train.max_steps=5", "train.torch_threads=1",
                                         "telemetry.log_every=5", "api.port=9200", "paths.state_dir=/tmp/x",
                                         "upload.enabled=false", "mining.qbatch=128", "embeddings.cache_l1_mb=1",
                                         "ft.replica_group=3", "checkpoint.keep=9"])
    def test_what_may_differ(self, setting: str) -> None:
        assert self.digest(setting) == self.digest()


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

    def test_a_tokenizer_path_is_not_a_secret(self) -> None:
        """"token" makes a key secret; "tokenizer" does not: its error line names the path."""
        (line,) = problems("lm.tokenizer=/no/such/tokenizer.json")
        assert "'/no/such/tokenizer.json'" in line and "*" not in line, line

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
            # An index inside a 182 x 182 block overflows the artifact's int16.
            ("compression.block=182", "compression.block: input should be less than or equal to 181"),
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
        ("ft.token_file=", "config error: ft.token_file: is required with ft.enabled: replica groups prove a "
                           "shared secret"),
        ("ft.token_file=/dev/zero", "config error: ft.token_file: must be a regular file of 16 to 4096 bytes"),
        ("ft.token_file={short}", "config error: ft.token_file: must be a regular file of 16 to 4096 bytes"),
        ("ft.ports=80-90", "config error: ft.ports: must be ports between 1024 and 65535"),
        ("ft.ports=29600-29601", "config error: ft.ports: must hold at least 3 ports"),
        ("ft.ports=some", "config error: ft.ports: must be a range of ports, like 29600-29699"),
        ("ft.max_update_norm=-1", "config error: ft.max_update_norm: input should be greater than or equal to 0"),
    ])
    def test_fault_tolerance_settings(self, setting: str, expected: str, tmp_path: Path) -> None:
        token, short = tmp_path / "token", tmp_path / "short"
        token.write_bytes(b"0123456789abcdef0123")
        short.write_bytes(b"1234")
        (line,) = problems("ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510", f"ft.token_file={token}",
                           setting.format(short=short))
        assert line.startswith(expected), line

    @pytest.mark.parametrize("sync", ["ddp", "diloco"])
    def test_fault_tolerance_under_torchrun(self, sync: str, tmp_path: Path) -> None:
        # A torchrun job is one replica group: DDP or DiLoCo inside it, torchft's DiLoCo across groups.
        (tmp_path / "token").write_bytes(b"0123456789abcdef0123")
        cfg = load_config(None, ["ft.enabled=true", "ft.lighthouse=http://127.0.0.1:29510",
                                 f"ft.token_file={tmp_path / 'token'}", "ft.ports=29600-29699",
                                 "train.effective_batch_size=32", f"train.sync={sync}"], environ={}, world_size=2)
        assert cfg.ft.enabled and cfg.train.sync == sync and cfg.ft.ports == "29600-29699"

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
        from daemon.storage import S3Storage

        storage = S3Storage("s3://bucket/prefix", "https://user:pa@ss/word@127.0.0.1:9",
                            environ={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
        # describe() is what UPLOAD lines, /status and the bundle show.
        assert storage.describe() == "s3://bucket/prefix at https://user:********@127.0.0.1:9"
        err = storage._wrap("put x", OSError(f"could not connect to {storage.endpoint_url}"))
        assert "pa@ss" not in str(err) and "********" in str(err)
