"""The [nats] table of a config file and the refusals of settings that cannot work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeseq.daemon.options import build_config
from edgeseq.daemon.transports.nats import stream_sequence
from edgeseq.errors import UsageError


def _config(tmp_path: Path, text: str, **overrides: object) -> object:
    path = tmp_path / "serve.toml"
    path.write_text(text, encoding="utf-8")
    return build_config(path, {"model": "m.onnx", **overrides})


def test_a_nats_table_sets_every_nats_setting(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[nats]\nservers = "nats://10.0.0.1:4222,nats://10.0.0.2:4222"\n'
        'partitions = 256\nreplicas = 5\nlease_ttl = "10s"\n'
        'checkpoint_interval = "2m"\nretention = "24h"\nin = "plant.*.in"\n'
        'out = "plant.{id}.out"\nstream = "PLANT"\nname = "gw-1"\n',
    )
    assert config.nats == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    assert (config.nats_partitions, config.nats_replicas) == (256, 5)
    assert (config.nats_lease_ttl, config.nats_checkpoint_interval) == (10.0, 120.0)
    assert config.nats_retention == 86_400.0
    assert (config.nats_in, config.nats_out, config.nats_stream) == (
        "plant.*.in",
        "plant.{id}.out",
        "PLANT",
    )
    assert config.nats_name == "gw-1"


def test_the_command_line_overrides_the_nats_table(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[nats]\nservers = "nats://a:4222"\npartitions = 8\n',
        nats="nats://b:4222",
        nats_partitions=32,
    )
    assert (config.nats, config.nats_partitions) == ("nats://b:4222", 32)


@pytest.mark.parametrize(
    ("text", "overrides", "says"),
    [
        (
            'nats = "nats://h:4222"\nlisten = "tcp://127.0.0.1:0"\n',
            {},
            "cannot be combined with listen",
        ),
        ('nats = "nats://h:4222"\nstate_dir = "s"\n', {}, "cannot be combined with state_dir"),
        ('nats = "tcp://h:4222"\n', {}, "expected nats://HOST:PORT"),
        ('nats = " , "\n', {}, "expected nats://HOST:PORT"),
        ('[nats]\nservers = "nats://h:1"\nin = "a.b"\n', {}, "one '*' token"),
        ('[nats]\nservers = "nats://h:1"\nin = "a.*.*"\n', {}, "one '*' token"),
        ('[nats]\nservers = "nats://h:1"\nin = "a.>.*"\n', {}, "one '*' token"),
        ('[nats]\nservers = "nats://h:1"\nout = "a.out"\n', {}, "an {id} token"),
        ('[nats]\nservers = "nats://h:1"\npartitions = 0\n', {}, "expected 1 to 4096"),
        ('[nats]\nservers = "nats://h:1"\nreplicas = 2\n', {}, "nats_replicas is 2"),
        ('[nats]\nservers = "nats://h:1"\nstream = "a.b"\n', {}, "nats_stream is 'a.b'"),
        ('[nats]\nservers = "nats://h:1"\nlease_ttl = "0s"\n', {}, "nats_lease_ttl is 0.0"),
        (
            '[nats]\nservers = "nats://h:1"\nfrobnicate = 1\n',
            {},
            "unknown setting 'nats_frobnicate'",
        ),
        ('[nats]\nservers = "nats://h:1"\npartitions = "many"\n', {}, "expected a int"),
        ("[nats.deeper]\nx = 1\n", {}, "expected a setting, not a table"),
    ],
)
def test_nats_settings_that_cannot_work_are_refused_naming_the_setting(
    tmp_path: Path, text: str, overrides: dict[str, object], says: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(says)):
        _config(tmp_path, text, **overrides)


def test_the_stream_sequence_is_read_from_both_reply_subject_layouts() -> None:
    assert stream_sequence("$JS.ACK.EDGESEQ.c1.1.4711.17.1733600000000000000.0") == 4711
    v2 = "$JS.ACK.hub.ACCHASH.EDGESEQ.c1.1.4712.18.1733600000000000000.0.abc"
    assert stream_sequence(v2) == 4712
