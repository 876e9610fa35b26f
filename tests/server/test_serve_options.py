"""`editrt serve` options that become server settings: --allowed-origin reaches the edge's Origin check; a bad
origin is a one-line error naming the option. No pipeline is loaded: the edge check runs on the settings."""
import argparse

import pytest

from editrt.errors import InputError
from editrt.runtime.server.app import refusal
from editrt.runtime.server.cli import configure_parser, settings_from


def settings_of(*argv):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return settings_from(parser.parse_args(["--weights", "tiny", *argv]))


def scope(origin: str, host: str = "127.0.0.1:8000"):
    return {"type": "http", "path": "/healthz", "headers": [(b"host", host.encode()), (b"origin", origin.encode())]}


def test_allowed_origins_reach_the_origin_check():
    settings = settings_of("--allowed-origin", "https://Editor.example.com/", "--allowed-origin", "http://127.0.0.1:5173")
    assert settings.allowed_origins == ("https://editor.example.com", "http://127.0.0.1:5173")
    assert refusal(settings, scope("https://editor.example.com")) is None
    assert refusal(settings, scope("http://127.0.0.1:5173")) is None
    status, field, _ = refusal(settings, scope("https://evil.example.com"))
    assert (status, field) == (403, "origin")
    assert settings_of().allowed_origins == ()
    assert refusal(settings_of(), scope("https://editor.example.com"))[0] == 403


@pytest.mark.parametrize("origin", ["editor.example.com", "ftp://example.com", "https://example.com/page",
                                    "https://user@example.com", "https://"])
def test_a_bad_allowed_origin_is_an_error_naming_the_option(origin):
    with pytest.raises(InputError, match="--allowed-origin") as caught:
        settings_of("--allowed-origin", origin)
    assert caught.value.field == "allowed_origin"
