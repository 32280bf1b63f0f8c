"""Settings refuse bad secrets outside development; tokens pin HS256 and check every claim."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets as secrets_module
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID, uuid4

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from adapters.api.deps import VerifiedTokens, current_user
from adapters.api.envelope import ApiError
from adapters.settings import S3_PORT_MAX, Settings, SettingsError, load_settings
from adapters.tokens import LEEWAY_S, TokenInvalid, TokenIssuer
from domain.contracts.callback import sign_callback, verify_callback

SECRET = "s3cr3t-0f-f0rty-e1ght-bytes-f0r-the-callback-key"  # signs GPU callbacks
OTHER_SECRET = "an0ther-0f-f0rty-e1ght-bytes-f0r-the-dev1ce-keys"
NOW = datetime.now(UTC)


def fresh_claims(user: UUID | None = None) -> dict[str, object]:
    """A client token's valid claims as of now (NOW, taken at import, is past their 60 s exp by
    the time a long run gets to a test)."""
    now = int(time.time())
    return {"sub": str(user or uuid4()), "iat": now, "exp": now + 60, "iss": "palette", "aud": "palette-app"}


def test_development_secrets_are_generated_once_into_the_data_dir(tmp_path):
    first = load_settings(data_dir=tmp_path)
    second = load_settings(data_dir=tmp_path)
    assert len(first.jwt_secret) >= 32 and first.jwt_secret == second.jwt_secret
    assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600


def test_processes_making_a_data_dirs_secrets_at_once_all_get_the_ones_written(tmp_path, monkeypatch):
    """Two `palette up` (or `palette up` and `palette env`) on a fresh data directory: each made
    its own secrets and wrote them, the last rename won, and the first went on (initdb included)
    with a database password the file no longer held; or one's rename took the other's half-made
    file. Here both writers meet before writing, as processes started together do."""
    import threading

    from adapters import settings as settings_module

    meeting, write = threading.Barrier(2, timeout=1), settings_module.write_whole

    def met_then_written(*args, **kwargs):
        with contextlib.suppress(threading.BrokenBarrierError):  # the other waits for this one's secrets
            meeting.wait()
        write(*args, **kwargs)

    monkeypatch.setattr(settings_module, "write_whole", met_then_written)
    got: list[object] = []

    def load() -> None:
        try:
            got.append(load_settings(data_dir=tmp_path).pg_password)
        except Exception as e:  # noqa: BLE001 - what went wrong is the assertion's
            got.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stored = json.loads((tmp_path / "secrets.json").read_text())["pg_password"]
    assert got == [stored, stored]


@pytest.mark.parametrize("secret", ["changeme", "short-secret", "", "k" * 64, "abcdefg" * 8])
def test_production_refuses_placeholder_short_or_repetitive_secrets(tmp_path, secret):
    with pytest.raises(SettingsError, match="PALETTE_JWT_SECRET") as e:
        load_settings(env="production", data_dir=tmp_path, jwt_secret=secret, callback_secret=SECRET,
                      device_key_secret=OTHER_SECRET)
    assert secret not in str(e.value) or not secret


def test_the_settings_repr_shows_no_secret():
    # A settings object logged or shown in a traceback's locals must not carry a credential.
    values = {name: f"{name}-value-{secrets_module.token_hex(8)}" for name in
              ("jwt_secret", "callback_secret", "s3_secret_key", "pg_password", "device_key_secret",
               "audit_signing_key")}
    url = f"postgresql://palette:{secrets_module.token_hex(8)}@127.0.0.1:5433/palette"
    settings = Settings(database_url=url, **values)
    shown = repr(settings) + str(settings)
    for name, value in [*values.items(), ("database_url", url)]:
        assert getattr(settings, name) == value  # still there to use
        assert value not in shown, name
    assert "jwt_issuer='palette'" in shown  # the rest is still shown


@pytest.mark.parametrize(("first", "second"), [("jwt_secret", "callback_secret"), ("jwt_secret", "device_key_secret"),
                                               ("callback_secret", "device_key_secret")])
def test_production_refuses_one_secret_for_two_purposes(tmp_path, first, second):
    secrets = {"jwt_secret": secrets_module.token_urlsafe(48), "callback_secret": SECRET,
               "device_key_secret": OTHER_SECRET}
    secrets[second] = secrets[first]
    with pytest.raises(SettingsError, match=f"^PALETTE_{second.upper()} must differ from PALETTE_{first.upper()}") as e:
        load_settings(env="production", data_dir=tmp_path, **secrets)
    assert secrets[first] not in str(e.value)


@pytest.mark.parametrize("where", ["environment", "data dir"])
def test_a_device_key_secret_the_keyer_refuses_is_a_settings_error_in_development_too(tmp_path, where):
    """HmacDeviceKeyer takes no secret under 16 bytes; development skips the production checks, so
    such a secret (PALETTE_DEVICE_KEY_SECRET=dev, a hand-edited secrets.json) passed the settings
    and every process that builds the container (palette serve, palette admin erase) ended in a
    traceback. It is a one-line SettingsError naming the setting, not the value."""
    import json

    from application.device_keys import MIN_SECRET_BYTES, HmacDeviceKeyer

    short = "d3v-s3cr3t"
    if where == "data dir":
        made = load_settings(data_dir=tmp_path)
        (tmp_path / "secrets.json").write_text(json.dumps({
            **{name: getattr(made, name) for name in json.loads((tmp_path / "secrets.json").read_text())},
            "device_key_secret": short}))
    with pytest.raises(SettingsError, match=r"^PALETTE_DEVICE_KEY_SECRET must be at least 16 bytes") as e:
        load_settings(data_dir=tmp_path, **({"device_key_secret": short} if where == "environment" else {}))
    assert "\n" not in str(e.value) and short not in str(e.value)
    enough = "d" * MIN_SECRET_BYTES  # what the keyer takes, development takes
    HmacDeviceKeyer(load_settings(data_dir=tmp_path, device_key_secret=enough).device_key_secret)


def test_invalid_setting_is_one_line_naming_it(tmp_path):
    with pytest.raises(SettingsError, match="PALETTE_API_PORT") as e:
        load_settings(data_dir=tmp_path, api_port=70000)
    assert "\n" not in str(e.value)


def test_a_data_dir_that_is_a_file_or_under_one_is_named_as_such_not_as_unwritable(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(SettingsError, match=r"^data directory .*/afile cannot be made: "
                                            r"the data directory is a file, not a directory$"):
        load_settings(data_dir=blocker)
    with pytest.raises(SettingsError, match=rf"^data directory .*/afile/sub/dir cannot be made: "
                                            rf"its parent {blocker} is a file, not a directory$"):
        load_settings(data_dir=blocker / "sub" / "dir")
    with pytest.raises(SettingsError, match=r"^data directory /proc/palette-data is not writable: "):
        load_settings(data_dir=Path("/proc/palette-data"))


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_data_dir_is_refused_not_taken_for_the_working_directory(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PALETTE_DATA_DIR", value)
    with pytest.raises(SettingsError, match=r"invalid setting PALETTE_DATA_DIR: .*is empty") as e:
        load_settings()
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no secrets.json in whatever directory it ran in


@pytest.mark.parametrize("where", ["an unknown user's home", "a symlink loop"])
def test_a_data_dir_that_cannot_be_resolved_is_refused_in_one_line(tmp_path, monkeypatch, where):
    # Path.expanduser and Path.resolve raise RuntimeError for these: every command ended on a traceback.
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    value = "~palette-no-such-user/data" if where == "an unknown user's home" else str(tmp_path / "a" / "data")
    monkeypatch.setenv("PALETTE_DATA_DIR", value)
    with pytest.raises(SettingsError, match=r"^invalid setting PALETTE_DATA_DIR: ") as e:
        load_settings()
    assert "\n" not in str(e.value)


INT_SETTINGS = [name for name, field in Settings.model_fields.items() if field.annotation is int]


@pytest.mark.parametrize("name", INT_SETTINGS)
def test_a_whole_number_setting_past_64_bits_is_refused_in_one_line(tmp_path, monkeypatch, name):
    # 400 digits were taken: the rate limits turn their bursts and days into floats, and every
    # job creation (PALETTE_RATE_JOBS_BURST) or registration was a 500 on an OverflowError.
    monkeypatch.setenv(f"PALETTE_{name.upper()}", "9" * 400)
    with pytest.raises(SettingsError, match=rf"^invalid setting PALETTE_{name.upper()}: ") as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_the_largest_whole_numbers_the_settings_take_make_rate_limits_that_work(tmp_path, monkeypatch):
    from adapters.api.rate_limit import Budget
    from adapters.settings import MAX_WHOLE_SETTING as largest

    for name in ("rate_jobs_burst", "rate_jobs_per_day", "rate_jobs_per_address_per_day"):
        monkeypatch.setenv(f"PALETTE_{name.upper()}", str(largest))
    s = load_settings(data_dir=tmp_path)
    budget = Budget(s.rate_jobs_per_s, s.rate_jobs_burst, s.rate_jobs_per_day,
                    per_address_day=s.rate_jobs_per_address_per_day)
    budget.take("user", "127.0.0.1")
    assert budget.pace.wait_s("user") == 0


def test_every_s3_port_allowed_leaves_seaweedfs_ports_that_exist(tmp_path):
    from infra.stack import embedded_ports

    highest = load_settings(env="development", data_dir=tmp_path, s3_port=S3_PORT_MAX)
    assert max(embedded_ports(highest).values()) == 65535
    with pytest.raises(SettingsError, match="PALETTE_S3_PORT"):
        load_settings(env="development", data_dir=tmp_path, s3_port=S3_PORT_MAX + 1)


@pytest.mark.parametrize("content", ['{"jwt_secret": "abc",', "[]", '{"jwt_secret": 5}', "", '{"jwt_secret": ""}',
                                     '{"note": "x"}', '{"database_url": "postgresql://u:my secret@db/x"}',
                                     '{"jwt_secret": "k", "my secret": "k"}'])
def test_a_development_secrets_file_that_is_not_a_json_object_of_strings_is_one_line_naming_it(tmp_path, content):
    """A hand-edited secrets file: a SettingsError (what the command line shows in one line), not
    a traceback from the JSON parser, a secret that is not a string or is empty, or another
    setting taken from it unvalidated (an unknown name was a traceback)."""
    (tmp_path / "secrets.json").write_text(content)
    with pytest.raises(SettingsError, match=r"secrets\.json") as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value) and "secret@" not in str(e.value) and "my secret" not in str(e.value)


@pytest.mark.parametrize(("secret", "accepted"), [
    ("0123456789abcdef" * 2, True),  # 256 bits, what HS256 wants
    (("0123456789abcdef" * 2)[:31], False),
    ("\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7" * 2, True),  # 16 characters, 32 bytes: counted in bytes
    ("\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7" + "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6k", False),
    ("01234567" * 4, True),  # 8 different characters
    ("0123456" * 5, False),  # 7
])
def test_production_wants_signing_secrets_of_at_least_32_bytes_and_8_characters(tmp_path, secret, accepted):
    def load() -> Settings:
        return load_settings(env="production", data_dir=tmp_path, jwt_secret=secret, callback_secret=SECRET,
                             device_key_secret=OTHER_SECRET)

    if accepted:
        assert load().jwt_secret == secret
    else:
        with pytest.raises(SettingsError, match="PALETTE_JWT_SECRET"):
            load()


@pytest.mark.parametrize("setting", ["s3_bucket", "broker_bucket"])
def test_a_bucket_name_shorter_than_s3_allows_is_refused_in_one_line(tmp_path, setting):
    with pytest.raises(SettingsError, match=f"PALETTE_{setting.upper()}") as e:
        load_settings(data_dir=tmp_path, **{setting: "ab"})
    assert "\n" not in str(e.value)
    assert getattr(load_settings(data_dir=tmp_path, **{setting: "abc"}), setting) == "abc"


@pytest.mark.parametrize("setting", ["s3_bucket", "broker_bucket"])
@pytest.mark.parametrize("name", ["Palette_Images", "palette images", "-palette", "palette-", "a..b",
                                  "192.168.0.1", "p" * 64])
def test_a_bucket_name_s3_would_refuse_is_refused_in_one_line(tmp_path, setting, name):
    # `palette up` created it in SeaweedFS only after PostgreSQL had started, and ended on
    # botocore's InvalidBucketName traceback.
    with pytest.raises(SettingsError, match=f"PALETTE_{setting.upper()}") as e:
        load_settings(data_dir=tmp_path, **{setting: name})
    assert "\n" not in str(e.value)
    assert getattr(load_settings(data_dir=tmp_path, **{setting: "palette.images-2"}), setting) == "palette.images-2"


@pytest.mark.parametrize(("host", "url"), [("::1", "http://[::1]:8000"), ("::", "http://[::]:8000"),
                                         ("127.0.0.1", "http://127.0.0.1:8000"), ("localhost", "http://localhost:8000")])
def test_the_gpu_workers_callback_url_holds_an_ipv6_api_host_in_brackets(tmp_path, host, url):
    # "http://::1:8000" is no URL (httpx: "Invalid port"): every callback of the GPU worker failed.
    import httpx

    settings = load_settings(data_dir=tmp_path, api_host=host, api_port=8000)
    assert settings.api_url == url
    assert httpx.URL(settings.api_url).port == 8000


@pytest.mark.parametrize("url", ["http://::1:8000", "api.internal:8000", "http:///callbacks", "ftp://api",
                                 "http://api:99999", "http://api:0"])
def test_a_callback_url_the_gpu_workers_client_cannot_use_is_refused_in_one_line(tmp_path, url):
    # The IPv6 form ended the worker at every start (httpx: "Invalid port"); the others failed
    # every callback, and the worker took the GPU queue's tasks again for ever.
    with pytest.raises(SettingsError, match="PALETTE_CALLBACK_URL") as e:
        load_settings(data_dir=tmp_path, callback_url=url)
    assert "\n" not in str(e.value)
    for usable in ("http://[::1]:8000", "https://api.example.com/palette", ""):
        assert load_settings(data_dir=tmp_path, callback_url=usable).callback_url == usable


@pytest.mark.parametrize("setting", ["api_host", "metrics_host"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_host_is_refused_not_taken_for_every_interface(tmp_path, monkeypatch, setting, value):
    # PALETTE_API_HOST="" served the API on every interface, and `palette up`'s probe of
    # http://:8000/health never passed: "api not ready after 60s" a minute on.
    monkeypatch.setenv(f"PALETTE_{setting.upper()}", value)
    with pytest.raises(SettingsError, match=f"PALETTE_{setting.upper()}: .*is empty") as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(f"PALETTE_{setting.upper()}", "0.0.0.0")  # noqa: S104 - every interface, said
    assert getattr(load_settings(data_dir=tmp_path), setting) == "0.0.0.0"  # noqa: S104


def test_an_empty_jwt_audience_is_refused_not_a_server_that_refuses_every_token_it_issues(tmp_path, monkeypatch):
    # PyJWT takes an empty "aud" claim for a missing one: with PALETTE_JWT_AUDIENCE="" the API
    # started, issued tokens at registration, and answered 401 to every request carrying one.
    monkeypatch.setenv("PALETTE_JWT_AUDIENCE", "")
    with pytest.raises(SettingsError, match=r"PALETTE_JWT_AUDIENCE: .*is empty") as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("PALETTE_JWT_AUDIENCE", "palette-mobile")
    settings = load_settings(data_dir=tmp_path)
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_s)
    user = uuid4()
    assert issuer.verify(issuer.issue(user, datetime.now(UTC))) == (user, "client")


@pytest.mark.parametrize("bootstrap", ["kafka:abc", "kafka:9092/x", "kafka:99999", "kafka:0", ":9092",
                                       "kafka:9092,,kafka2:9092", " , "])
def test_a_kafka_bootstrap_the_clients_cannot_read_is_refused_in_one_line(tmp_path, bootstrap):
    # "kafka:abc" ended `palette serve gpu` (and every process making a client) on kafka-python's
    # traceback (ValueError: invalid literal for int()); `palette up` waited 60 s on the broker.
    with pytest.raises(SettingsError, match="PALETTE_KAFKA_BOOTSTRAP") as e:
        load_settings(data_dir=tmp_path, kafka_bootstrap=bootstrap)
    assert "\n" not in str(e.value)
    for usable in ("127.0.0.1:9092", "kafka", "k1:9092,k2:9093", "[::1]:9092", "PLAINTEXT://kafka:9092", ""):
        assert load_settings(data_dir=tmp_path, kafka_bootstrap=usable).kafka_bootstrap == usable


@pytest.mark.parametrize("url", ["localhost:8333", "127.0.0.1:8333", "ftp://s3.example.com", "http://::1:8333",
                                 "http://s3:99999", "http://s3:0", "http://s3:port", "http:///bucket",
                                 "s3.example.com"])
def test_an_s3_endpoint_the_s3_clients_cannot_use_is_refused_in_one_line(tmp_path, url):
    # Without a scheme it was botocore's "Invalid endpoint" in each process, which `palette up`
    # reported as "cannot reach the object store ...; is the stack up (`make run`)"; another
    # scheme or port made clients that failed every request (`palette up` waited 60 s on SeaweedFS).
    with pytest.raises(SettingsError, match="PALETTE_S3_ENDPOINT") as e:
        load_settings(data_dir=tmp_path, s3_endpoint=url)
    assert "\n" not in str(e.value)
    for usable in ("http://127.0.0.1:8333", "http://[::1]:8333", "https://s3.example.com/base", "http://localhost", ""):
        assert load_settings(data_dir=tmp_path, s3_endpoint=usable).s3_endpoint == usable


@pytest.mark.parametrize("region", ["eu west", "eu-west-1\u00e9", "-eu", "eu-", "123", "e" * 64])
def test_a_region_botocore_would_refuse_is_refused_in_one_line(tmp_path, region):
    # Every S3 client refused it (InvalidRegionError): `palette up` waited 60 s for SeaweedFS and
    # blamed it ("s3 not ready"), and each process that made a client ended on a traceback.
    import boto3
    from botocore.exceptions import InvalidRegionError

    with pytest.raises(SettingsError, match="PALETTE_S3_REGION") as e:
        load_settings(data_dir=tmp_path, s3_region=region)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidRegionError):
        boto3.client("s3", region_name=region, endpoint_url="http://127.0.0.1:1")
    assert load_settings(data_dir=tmp_path, s3_region="eu-west-1").s3_region == "eu-west-1"


@pytest.mark.parametrize(("name", "value"), [
    ("PALETTE_WEBHOOK_KEEP_DAYS", "inf"),  # "keep them for ever": the prune's interval, out of PostgreSQL's range
    ("PALETTE_WEBHOOK_KEEP_DAYS", "1e7"),  # now() minus that is before 4713 BC, out of a timestamp's range
    ("PALETTE_WEBHOOK_KEEP_DAYS", "3651"),
    ("PALETTE_AUDIT_CHECKPOINT_INTERVAL_S", "inf"),  # threading's wait overflows: the checkpointer died
    ("PALETTE_AUDIT_CHECKPOINT_INTERVAL_S", "1e10"),  # finite, and still past threading's TIMEOUT_MAX: the same
    ("PALETTE_AUDIT_CHECKPOINT_INTERVAL_S", str(10 * 365 * 86400 + 1)),  # past ten years, as the sweeper's waits
    ("PALETTE_SWEEP_INTERVAL_S", "Infinity"),  # with PALETTE_ERASURE_SWEEP_S=inf, the sweeper's wait overflowed
    ("PALETTE_ERASURE_SWEEP_S", "inf"),
])
def test_a_time_setting_that_is_infinite_or_past_what_its_use_can_hold_is_refused_in_one_line(
        tmp_path, monkeypatch, name, value):
    """Accepted, each failed only where it was used: PALETTE_WEBHOOK_KEEP_DAYS=inf made every
    hourly prune fail in PostgreSQL ("interval out of range"), so neither old deliveries nor the
    secrets a rotation replaced were ever forgotten, with a warning an hour as the only sign."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name) as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value)


TEN_YEARS_S = 10 * 365 * 86400


@pytest.mark.parametrize("name", ["PALETTE_JWT_TTL_S", "PALETTE_DISPATCH_STALE_S", "PALETTE_IDEMPOTENCY_TTL_S",
                                  "PALETTE_WEBHOOK_DISABLE_AFTER_S", "PALETTE_ERASURE_GRACE_S"])
def test_a_span_postgresql_subtracts_from_now_is_at_most_ten_years(tmp_path, monkeypatch, name):
    """Each is ``value * interval '1 second'`` in a query, subtracted from now() or compared with
    a span: past about 6,700 years (2.1e11 s) now() less it is "timestamp out of range", past
    9.2e12 s the interval itself is out of range. Such values were accepted, and then every keyed
    request failed (PALETTE_IDEMPOTENCY_TTL_S), the stale jobs were never dispatched again, the
    erasures a crash cut short were never finished, no API process learned of an erasure by
    another (PALETTE_JWT_TTL_S: the erased user's tokens stayed good there), or no failed webhook
    attempt was recorded (its lease ran out, and it was sent again)."""
    monkeypatch.setenv(name, str(TEN_YEARS_S + 1))
    with pytest.raises(SettingsError, match=name) as e:
        load_settings(data_dir=tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(name, str(TEN_YEARS_S))
    assert getattr(load_settings(data_dir=tmp_path), name.removeprefix("PALETTE_").lower()) == TEN_YEARS_S


def test_webhook_keep_days_up_to_ten_years_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("PALETTE_WEBHOOK_KEEP_DAYS", "3650")
    assert load_settings(data_dir=tmp_path).webhook_keep_days == 3650


def test_a_metrics_port_that_would_put_a_processs_port_past_65535_is_refused(tmp_path):
    from adapters.observability import OFFSETS

    with pytest.raises(SettingsError, match="PALETTE_METRICS_PORT"):
        load_settings(data_dir=tmp_path, metrics_port=65535 - max(OFFSETS.values()) + 1)


def test_a_password_with_url_characters_reaches_the_database_url_intact(tmp_path):
    from urllib.parse import unquote, urlsplit

    password = "p@ss:w/rd?#% \u00e9"
    url = urlsplit(load_settings(data_dir=tmp_path, pg_password=password, pg_port=6000).effective_database_url)
    assert (url.hostname, url.port, url.username, url.path) == ("127.0.0.1", 6000, "palette", "/palette")
    assert unquote(url.password or "") == password


@pytest.mark.parametrize(("url", "accepted"), [
    ("postgresql://u:se%20cret@db.example:5432/palette", True),
    ("postgres://u:secret@db.example/palette?sslmode=require", True),
    ("postgresql://u:se cret@db.example:5432/palette", False),  # an unencoded space
    ("postgresql://u:se/cret@db.example/palette", False),  # an unencoded "/": its netloc ends at it
    ("postgresql://u:secret@db.example:54x/palette", False),
    ("postgresql://u:secret@h1.example:5432,h2.example:5433/palette", False),
    ("postgresql://u:secret@[::1]:5432/palette", True),
    ("postgresql://u:se,cret@db.example/palette", True),  # a password's ",": one host
    # an unencoded "@": libpq's host is "cret@db.example" (every psycopg.connect failed, its error
    # quoting that part of the password), urlsplit's, the event store's, db.example
    ("postgresql://u:se@cret@db.example/palette", False),
    ("postgresql://u@ser:secret@db.example/palette", False),
    ("postgresql://u:se\uff0fcret@db.example/palette", False),  # urlsplit's refusal quotes the netloc
    ("postgresql://u:secret@db.example:5432/palette?nosuchoption=1", False),
    ("mysql://u:secret@db.example/palette", False),
    ("u:secret@db.example/palette", False),
    # where libpq and the event store (which reads the URL's host, port, user, password and
    # database) would connect to two servers: no host (libpq's Unix socket, the store's
    # 127.0.0.1), or a query parameter libpq takes over the URL's part
    ("postgresql:///palette", False),
    ("postgresql://u:secret@/palette", False),
    ("postgresql://u:secret@db.example/palette?host=other.example", False),
    ("postgresql://u:secret@/palette?host=/var/run/postgresql", False),
    ("postgresql://u:secret@db.example/palette?hostaddr=10.0.0.9", False),
    ("postgresql://u:secret@db.example/palette?port=6543", False),
    ("postgresql://u:secret@db.example/palette?dbname=other", False),
    ("postgresql://u:secret@db.example/palette?user=other", False),
    ("postgresql://u@db.example/palette?password=secret", False),
    ("postgresql://u:secret@db.example/palette?application_name=x&connect_timeout=5", True),
])
def test_a_database_url_libpq_cannot_read_is_refused_in_one_line_without_its_text(tmp_path, url, accepted):
    if accepted:
        assert load_settings(data_dir=tmp_path, database_url=url).effective_database_url == url
        return
    with pytest.raises(SettingsError, match="PALETTE_DATABASE_URL") as e:
        load_settings(data_dir=tmp_path, database_url=url)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_a_secret_set_in_developments_environment_is_kept_over_the_data_dirs(tmp_path):
    made = load_settings(data_dir=tmp_path)
    mine = "m" * 48
    chosen = load_settings(data_dir=tmp_path, jwt_secret=mine)
    assert chosen.jwt_secret == mine
    assert chosen.callback_secret == made.callback_secret  # the others still from the data directory


def test_env_prints_derived_urls(tmp_path):
    s = load_settings(data_dir=tmp_path, pg_port=6000)
    env = s.as_env()
    assert env["PALETTE_DATABASE_URL"].endswith("@127.0.0.1:6000/palette")


def issuer() -> TokenIssuer:
    return TokenIssuer(SECRET, "palette", "palette-app", 3600)


def test_token_round_trip():
    user = uuid4()
    assert issuer().verify(issuer().issue(user, NOW)) == (user, "client")


def test_a_token_without_a_role_is_a_clients():
    user = uuid4()
    claims = fresh_claims(user)
    assert issuer().verify(jwt.encode(claims, SECRET, algorithm="HS256")) == (user, "client")


@pytest.mark.parametrize(("scheme", "accepted"), [("Bearer", True), ("bearer", True), ("Basic", False),
                                                  ("Token", False)])
def test_a_client_token_is_read_only_under_the_bearer_scheme(scheme, accepted):
    user = uuid4()
    app = SimpleNamespace(state=SimpleNamespace(verified_tokens=VerifiedTokens(issuer()), erased_users=set()))
    header = f"{scheme} {issuer().issue(user, NOW)}".encode()
    request = Request({"type": "http", "headers": [(b"authorization", header)], "app": app})
    if accepted:
        assert asyncio.run(current_user(request)) == user
    else:
        with pytest.raises(ApiError) as refused:
            asyncio.run(current_user(request))
        assert refused.value.code == "AUTH_REQUIRED"


@pytest.mark.parametrize("mutate", [
    lambda c: {**c, "exp": int((NOW - timedelta(hours=1)).timestamp())},
    lambda c: {**c, "aud": "someone-else"},
    lambda c: {**c, "iss": "evil"},
    lambda c: {k: v for k, v in c.items() if k != "exp"},
    lambda c: {k: v for k, v in c.items() if k != "iat"},
    lambda c: {k: v for k, v in c.items() if k != "sub"},
    lambda c: {k: v for k, v in c.items() if k != "iss"},
    lambda c: {k: v for k, v in c.items() if k != "aud"},
    lambda c: {**c, "nbf": int((NOW + timedelta(hours=1)).timestamp())},
])
def test_bad_claims_are_refused(mutate):
    claims = fresh_claims()
    assert issuer().verify(jwt.encode(claims, SECRET, algorithm="HS256"))[1] == "client"  # as made: valid
    token = jwt.encode(mutate(claims), SECRET, algorithm="HS256")
    with pytest.raises(TokenInvalid):
        issuer().verify(token)


@pytest.mark.parametrize(("past_exp", "accepted"), [(LEEWAY_S - 5, True), (LEEWAY_S + 5, False)])
def test_a_token_is_accepted_past_its_exp_by_the_leeway_and_no_longer(past_exp, accepted):
    """The leeway forgives clocks a few seconds apart, not a token expired minutes ago."""
    now = int(time.time())
    claims = {**fresh_claims(), "iat": now - 60, "exp": now - past_exp}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    if accepted:
        assert issuer().verify(token)[1] == "client"
    else:
        with pytest.raises(TokenInvalid):
            issuer().verify(token)


@pytest.mark.parametrize(("role", "age", "accepted"), [
    ("client", 3600, True), ("client", 3600 + LEEWAY_S + 2, False),
    ("analyst", 30 * 86400, True), ("auditor", 30 * 86400 + LEEWAY_S + 2, False),
    ("auditor", 30 * 86400, True), ("analyst", 30 * 86400 + LEEWAY_S + 2, False),
])
def test_a_token_older_than_this_server_mints_them_is_refused_whatever_its_exp(role, age, accepted):
    """Signed with the secret all the same (an old configuration, a hand-made 100-year token): a
    token cannot be revoked but by rotating the secret, and erased users' tokens are refused for as
    long as a client's lives. Counted from its issue, so a lower TTL shortens the tokens out."""
    now = int(time.time())
    claims = {"sub": str(uuid4()), "iat": now - age, "exp": now + 100 * 365 * 86400,
              "iss": "palette", "aud": "palette-app", "role": role}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    if accepted:
        assert issuer().verify(token)[1] == role
    else:
        with pytest.raises(TokenInvalid):
            issuer().verify(token)


def test_a_remembered_token_is_verified_again_once_older_than_this_server_mints_them():
    """Remembered until its exp, a 100-year token would pass unchecked for a century."""

    class Counting(TokenIssuer):
        calls = 0

        def verify(self, token: str) -> tuple[UUID, str]:
            self.calls += 1
            return super().verify(token)

    counting = Counting(SECRET, "palette", "palette-app", 3600)
    now = [time.time()]
    remembered = VerifiedTokens(counting, clock=lambda: now[0])
    iat = int(now[0]) - 100
    token = jwt.encode({"sub": str(uuid4()), "iat": iat, "exp": iat + 100 * 365 * 86400, "iss": "palette",
                        "aud": "palette-app"}, SECRET, algorithm="HS256")
    remembered.verify(token)
    now[0] = iat + 3600 + LEEWAY_S - 1
    remembered.verify(token)
    assert counting.calls == 1  # remembered within the hour it may live
    now[0] = iat + 3600 + LEEWAY_S + 1
    remembered.verify(token)  # (the issuer reads the real clock: still young there)
    assert counting.calls == 2  # past it: verified anew


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # our 48-byte key under HS512
@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_a_token_signed_with_our_secret_under_another_algorithm_is_refused(algorithm):
    """HS256 is pinned: the header's alg is never what decides how a token is checked."""
    claims = fresh_claims()
    assert issuer().verify(jwt.encode(claims, SECRET, algorithm="HS256"))[1] == "client"  # under HS256: valid
    with pytest.raises(TokenInvalid):
        issuer().verify(jwt.encode(claims, SECRET, algorithm=algorithm))


def test_remembered_tokens_are_bounded_and_the_oldest_is_forgotten_first():
    checked: list[str] = []

    class Recording(TokenIssuer):
        def verify(self, token: str) -> tuple[UUID, str]:
            checked.append(token)
            return super().verify(token)

    recording = Recording(SECRET, "palette", "palette-app", 3600)
    remembered = VerifiedTokens(recording, size=2)
    first, second, third = (recording.issue(uuid4(), NOW) for _ in range(3))
    for token in (first, second, third, third, second, first):
        remembered.verify(token)
    assert checked == [first, second, third, first]  # two remembered; the first pushed out by the third


def test_alg_none_and_wrong_key_and_tampering_are_refused():
    good = issuer().issue(uuid4(), NOW)
    header, payload, sig = good.split(".")
    none = jwt.encode({"sub": str(uuid4())}, None, algorithm="none")
    other = TokenIssuer("o" * 48, "palette", "palette-app", 3600).issue(uuid4(), NOW)
    tampered = f"{header}.{payload[:-2]}AA.{sig}"
    for token in (none, other, tampered, "not-a-token"):
        with pytest.raises(TokenInvalid):
            issuer().verify(token)


JOB = "00000000-0000-4000-8000-000000000001"


def test_callback_signature_window_and_body():
    now = int(time.time())
    body = b'{"idx":0}'
    sig = sign_callback(SECRET, now, JOB, body)
    assert verify_callback(SECRET, now, JOB, body, timestamp=str(now), signature=sig)
    # the window is 300 s either side of the receiver's clock, both ends in it
    for skew in (300, -300):
        assert verify_callback(SECRET, now + skew, JOB, body, timestamp=str(now), signature=sig), skew
    for skew in (301, -301):
        assert not verify_callback(SECRET, now + skew, JOB, body, timestamp=str(now), signature=sig), skew
    assert not verify_callback(SECRET, now, JOB, body + b" ", timestamp=str(now), signature=sig)
    assert not verify_callback("x" * 48, now, JOB, body, timestamp=str(now), signature=sig)
    assert verify_callback(SECRET, now, JOB, body, shared_secret=SECRET)
    assert not verify_callback(SECRET, now, JOB, body, shared_secret=SECRET[:-1])
    assert not verify_callback(SECRET, now, JOB, body)
    other_job = "00000000-0000-4000-8000-000000000002"
    assert not verify_callback(SECRET, now, other_job, body, timestamp=str(now), signature=sig)


@given(user=st.uuids(), at=st.integers(min_value=0, max_value=2**33),
       role=st.sampled_from(["client", "analyst", "auditor"]),
       ttl=st.none() | st.integers(min_value=1, max_value=10**8),
       secret=st.text(min_size=32, max_size=80), issuer=st.text(max_size=40), audience=st.text(max_size=40))
def test_an_issued_token_is_byte_for_byte_what_pyjwt_writes_for_its_claims(user, at, role, ttl, secret, issuer,
                                                                             audience):
    """TokenIssuer signs without jwt.encode (its per-call key checks): PyJWT is the oracle, for the
    bytes (encode) and for the claims read back under the pinned algorithm (decode)."""
    now = datetime.fromtimestamp(at, UTC)
    token = TokenIssuer(secret, issuer, audience, 3600).issue(user, now, role=role, ttl_s=ttl)
    claims = {"sub": str(user), "iat": at, "nbf": at, "exp": at + (ttl or 3600), "iss": issuer, "aud": audience,
              "role": role}
    assert token == jwt.encode(claims, secret, algorithm="HS256")
    assert jwt.decode(token, secret, algorithms=["HS256"], options={"verify_signature": True, "verify_exp": False,
                      "verify_nbf": False, "verify_iat": False, "verify_aud": False, "verify_iss": False}) == claims


@pytest.mark.parametrize("made", ["pg/PG_VERSION", "pg-elsewhere"], ids=["cluster here", "cluster noted elsewhere"])
def test_a_made_data_dir_whose_secrets_file_is_gone_is_refused_not_given_new_ones(tmp_path, made):
    """secrets.json deleted from a data directory whose stack was made with it: new secrets were
    made, and `palette up` waited a minute on PostgreSQL (its password the old one) to fail;
    worse, the users' device keys, tokens and S3 keys changed. It is refused, nothing written."""
    data = tmp_path / "data"
    (data / made).parent.mkdir(parents=True, exist_ok=True)
    (data / made).write_text("15\n")
    with pytest.raises(SettingsError, match=r"secrets\.json is missing") as e:
        load_settings(data_dir=data)
    assert "\n" not in str(e.value)
    assert not (data / "secrets.json").exists()
    given = {name: "s" * 48 for name in ("jwt_secret", "callback_secret", "s3_secret_key", "pg_password",
                                         "device_key_secret")}
    assert load_settings(data_dir=data, s3_access_key="palette0000", **given).pg_password == "s" * 48
