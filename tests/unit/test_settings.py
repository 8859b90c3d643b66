"""Settings: defaults, environment, flags, refusals; the README's table matches the code."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from proxy.runtime.check import check, otel_timeouts_in_milliseconds, short_secrets
from proxy.settings import SETTINGS, SettingError, Settings, parser, usable_cores


def test_defaults_are_the_specs() -> None:
    settings = Settings.from_env({})
    assert settings.server_host == "0.0.0.0" and settings.server_port == 8080
    assert settings.keys_file_path == "keys.json"
    assert settings.quota_enabled is True and settings.quota_limit == 100
    assert settings.quota_tokens is None and settings.quota_window_seconds == 3600
    assert settings.request_timeout == 600 and settings.stream_idle_timeout == 300
    assert settings.max_body_bytes == 10485760
    assert settings.log_to_file is False and settings.log_file_path == "interactions.jsonl"
    assert settings.log_bodies is False and settings.shutdown_grace_seconds == 30
    assert settings.redis_url is None and settings.quota_on_redis_error == "allow"
    assert settings.workers == 1


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    assert Settings.from_env({"SERVER_PORT": "9000"}).server_port == 9000
    assert Settings.from_env({"SERVER_PORT": "9000"}, ["--server-port", "9100"]).server_port == 9100
    assert Settings.from_env({}, ["--quota-tokens", "5000"]).quota_tokens == 5000


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QUOTA_LIMIT": "ten"}, "QUOTA_LIMIT"),
        ({"QUOTA_LIMIT": "-5"}, "QUOTA_LIMIT"),
        ({"SERVER_PORT": "70000"}, "SERVER_PORT"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT"),
        ({"STREAM_IDLE_TIMEOUT": "nan"}, "STREAM_IDLE_TIMEOUT"),
        ({"QUOTA_ENABLED": "maybe"}, "QUOTA_ENABLED"),
        ({"MAX_BODY_BYTES": "1.5"}, "MAX_BODY_BYTES"),
        ({"QUOTA_ON_REDIS_ERROR": "retry"}, "QUOTA_ON_REDIS_ERROR"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:notaport"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:99999/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://[::1"}, "REDIS_URL"),
        ({"SHUTDOWN_GRACE_SECONDS": "-1"}, "SHUTDOWN_GRACE_SECONDS"),
        # No request header is named so: the setting would never match one, silently
        ({"POOL_STICKY_HEADER": "x-session id"}, "POOL_STICKY_HEADER"),
        ({"POOL_STICKY_HEADER": "x-session-id: abc"}, "POOL_STICKY_HEADER"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError) as refused:
        Settings.from_env(env)
    assert str(refused.value).startswith(named)
    assert repr(next(iter(env.values()))) in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://app:s3cret@cache:6379",
        "redis://app:s3cret@cache:port",
        "rediss://:s3cret@[::1",
        # Schemes of other clients, which users try: they were quoted whole, password
        # included (the mask knew only schemes of letters).
        "redis+sentinel://:s3cret@sentinel:26379/mymaster",
        "redis-sentinel://app:s3cret@sentinel:26379",
        "Redis://:s3cret@cache:6379",
    ],
)
def test_a_refused_redis_url_is_quoted_without_its_password(url: str) -> None:
    # A port that is not a number, or a broken [IPv6] host, was taken and stopped the start
    # with redis-py's traceback (exit 1); a wrong scheme was quoted whole, password included.
    with pytest.raises(SettingError) as refused:
        Settings.from_env({"REDIS_URL": url})
    assert str(refused.value).startswith("REDIS_URL: ") and "s3cret" not in str(refused.value)
    assert url.replace("s3cret", "***") in str(refused.value)


def test_a_bad_flag_is_refused_naming_the_flag() -> None:
    with pytest.raises(SettingError, match="^--quota-limit: must be a positive integer, got 'x'$"):
        Settings.from_env({}, ["--quota-limit", "x"])


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"CORS_ALLOWED_ORIGINS": "https://app.example.com,x"},
            "CORS_ALLOWED_ORIGINS: 'x' is not an origin (a scheme and a host, like "
            "https://app.example.com)",
        ),
        ({"SERVER_PORT": "70000"}, "SERVER_PORT: must be a port number (0-65535), got '70000'"),
        ({"MAX_BODY_BYTES": "1.5"}, "MAX_BODY_BYTES: must be a positive integer, got '1.5'"),
        (
            {"STREAM_IDLE_TIMEOUT": "inf"},
            "STREAM_IDLE_TIMEOUT: must be a positive number of seconds, got 'inf'",
        ),
        (
            {"BREAKER_ERROR_RATIO": "2"},
            "BREAKER_ERROR_RATIO: must be a number from 0 to 1, got '2'",
        ),
        (
            {"QUOTA_ON_REDIS_ERROR": "Retry"},
            "QUOTA_ON_REDIS_ERROR: must be allow or deny, got 'Retry'",
        ),
        # Probes went out as often as asked: 0.001 sent each open target's provider a
        # thousand model lists a second, with its real key (its rate limit, the logs).
        (
            {"PROBE_INTERVAL_SECONDS": "0.001"},
            "PROBE_INTERVAL_SECONDS: must be 0 (no probes) or at least 1 second, got '0.001'",
        ),
        (
            {"PROBE_INTERVAL_SECONDS": "-1"},
            "PROBE_INTERVAL_SECONDS: must be 0 (no probes) or at least 1 second, got '-1'",
        ),
    ],
)
def test_the_parsers_own_words_reach_the_operator(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingError) as refused:
        Settings.from_env(env)
    assert str(refused.value) == says


@pytest.mark.parametrize(("given", "interval"), [("0", 0.0), ("1", 1.0), ("2.5", 2.5)])
def test_probes_are_off_or_at_most_one_a_second(given: str, interval: float) -> None:
    settings = Settings.from_env({"PROBE_INTERVAL_SECONDS": given})
    assert settings.probe_interval_seconds == interval


def test_every_setting_has_its_parser_and_help_in_one_declaration() -> None:
    for setting in SETTINGS:
        assert setting.help and callable(setting.parse), setting.variable
        assert setting.variable == setting.field.upper()
    assert [s.field for s in SETTINGS][:2] == ["server_host", "server_port"]


def test_several_workers_without_redis_are_refused_while_quotas_are_on() -> None:
    with pytest.raises(SettingError, match="REDIS_URL"):
        Settings.from_env({"WORKERS": "2"})
    assert Settings.from_env({"WORKERS": "2", "QUOTA_ENABLED": "false"}).workers == 2
    assert Settings.from_env({"WORKERS": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}).workers == 2


def test_several_workers_without_redis_are_refused_with_a_default_budget() -> None:
    # Budgets stay with QUOTA_ENABLED=false, and each worker would count its own spend:
    # WORKERS=2 let a key spend twice BUDGET_USD.
    with pytest.raises(SettingError, match="REDIS_URL while BUDGET_USD"):
        Settings.from_env({"WORKERS": "2", "QUOTA_ENABLED": "false", "BUDGET_USD": "5"})
    assert Settings.from_env({"WORKERS": "1", "QUOTA_ENABLED": "false", "BUDGET_USD": "5"})
    shared = {"REDIS_URL": "redis://127.0.0.1:6379/0", "BUDGET_USD": "5", "WORKERS": "2"}
    assert Settings.from_env(shared).budget_usd == 5


def test_help_lists_every_setting_as_a_flag() -> None:
    text = parser().format_help()
    for setting in SETTINGS:
        assert setting.flag in text and setting.variable in text


def test_help_tells_of_check() -> None:
    # --check [keys.json] is how an operator tests a change before a start or a reload;
    # --help, the first place they look, did not name it.
    assert "--check [KEYS_FILE]" in " ".join(parser().format_help().split())


def test_every_setting_is_a_field_with_the_same_default() -> None:
    defaults = Settings()
    # `otel` holds the OpenTelemetry SDK's own OTEL_* variables: the SDK names them, not a row;
    # `proxies` the outbound proxy variables (HTTPS_PROXY...), everyone's names.
    assert {s.field for s in SETTINGS} | {"otel", "proxies"} == set(Settings.__dataclass_fields__)
    for setting in SETTINGS:
        expected = None if setting.default is None else setting.parse(setting.default)
        assert getattr(defaults, setting.field) == expected, setting.variable


def test_the_readme_settings_table_matches_the_code() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| (.*?) \|", readme, re.MULTILINE))
    for setting in SETTINGS:
        assert setting.variable in rows, f"README lacks {setting.variable}"
        shown = rows[setting.variable].strip("` ")
        expected = "unset" if setting.default is None else setting.default
        assert shown == expected, (
            f"README shows {shown!r} for {setting.variable}, code has {expected!r}"
        )


def test_an_empty_variable_counts_as_unset() -> None:
    settings = Settings.from_env({"QUOTA_TOKENS": "", "REDIS_URL": " ", "QUOTA_LIMIT": ""})
    assert (
        settings.quota_tokens is None and settings.redis_url is None and settings.quota_limit == 100
    )


@pytest.mark.parametrize(
    "environ",
    [
        {"KEYS_STORE": "redis"},
        {"KEYS_STORE": "redis", "REDIS_URL": "redis://localhost:6379"},
        {"KEYS_STORE": "redis", "KEYS_STORE_SECRET": "s3cret"},
        {"KEYS_STORE": "etcd"},
    ],
)
def test_keys_in_redis_need_redis_and_a_secret(environ: dict[str, str]) -> None:
    with pytest.raises(SettingError, match="KEYS_STORE"):
        Settings.from_env(environ)
    secret = "keys-store-secret-0123"
    both = {
        "KEYS_STORE": "redis",
        "REDIS_URL": "redis://localhost:6379",
        "KEYS_STORE_SECRET": secret,
    }
    assert Settings.from_env(both).keys_store == "redis"
    assert secret not in repr(Settings.from_env(both))


@pytest.mark.parametrize("secret", ["hunter2", "changeme", "s3cret-s3cret-s3cre"])
def test_a_keys_store_secret_too_short_to_resist_guessing_draws_a_warning(secret: str) -> None:
    # A dump of Redis (an RDB file, a replica) lets anyone try secrets offline: each guess
    # is one SHA-256 and one HMAC against the stored document, so "changeme" falls at once and
    # every real key with it. Under 20 characters, as for a virtual key the API is given,
    # the start says so (without the secret), and still starts.
    environ = {"KEYS_STORE": "redis", "REDIS_URL": "redis://localhost:6379"}
    settings = Settings.from_env({**environ, "KEYS_STORE_SECRET": secret})
    (said,) = short_secrets(settings)
    assert said.startswith("KEYS_STORE_SECRET has fewer than 20") and secret not in said
    strong = Settings.from_env({**environ, "KEYS_STORE_SECRET": secret + "x" * 20})
    assert short_secrets(strong) == []


@pytest.mark.parametrize("token", ["admin", "sk-1234", "changeme-changeme12"])
def test_an_admin_token_too_short_to_resist_guessing_draws_a_warning(token: str) -> None:
    # ADMIN_TOKEN=admin: the token that exports every real key
    # (GET /admin/export?include_real_keys=true), whose digest each audit line shows, so
    # anyone reading the log could try tokens offline.
    (said,) = short_secrets(Settings.from_env({"ADMIN_TOKEN": token}))
    assert said.startswith("ADMIN_TOKEN has fewer than 20") and token not in said
    assert short_secrets(Settings.from_env({"ADMIN_TOKEN": token + "x" * 20})) == []


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"]
)
def test_an_otlp_timeout_written_in_milliseconds_draws_a_warning(variable: str) -> None:
    # The OpenTelemetry specification has it in milliseconds (10000 for 10 s); the Python SDK,
    # and so the gateway, reads seconds: 10000 held each export to a hung collector for
    # 2.8 hours, its spans dropped meanwhile (open-telemetry/opentelemetry-python#4044).
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    (said,) = otel_timeouts_in_milliseconds(Settings.from_env({**endpoint, variable: "10000"}))
    assert said.startswith(f"{variable}=10000 is read in seconds"), said
    assert otel_timeouts_in_milliseconds(Settings.from_env({**endpoint, variable: "30"})) == []
    assert otel_timeouts_in_milliseconds(Settings.from_env({variable: "10000"})) == []  # off


@pytest.mark.parametrize(
    "variable", ["QUOTA_WINDOW_SECONDS", "BUDGET_WINDOW_SECONDS", "AUTH_FAILURE_WINDOW_SECONDS"]
)
def test_a_window_longer_than_ten_years_is_refused(variable: str) -> None:
    # 1e308 seconds was taken, and the first 429 of such a window was a 500: its
    # retry-after-ms overflowed (a budget's "frees up at" date did from 1e17 seconds). The
    # lockout's 429 said "Retry-After: 1000000000000000052504760255204420248704468581108..."
    # (301 digits) for AUTH_FAILURE_WINDOW_SECONDS=1e300.
    assert getattr(Settings.from_env({variable: "315360000"}), variable.lower()) == 315360000
    with pytest.raises(SettingError) as refused:
        Settings.from_env({variable: "1e308"})
    assert str(refused.value) == (
        f"{variable}: must be a positive number of seconds, at most 315360000 (ten years), "
        "got '1e308'"
    )


def test_the_proxy_variables_are_read_as_curl_and_requests_read_them() -> None:
    environ = {
        "HTTPS_PROXY": "http://upper:3128",
        "https_proxy": "http://lower:3128",  # the lowercase name wins
        "HTTP_PROXY": "proxy.corp:8080",
        "NO_PROXY": "localhost,.internal",
        "ALL_PROXY": "",  # empty: unset
        "FTP_PROXY": "http://ftp:21",  # not a scheme the gateway speaks
    }
    assert Settings.from_env(environ).proxies == {
        "http": "proxy.corp:8080",
        "https": "http://lower:3128",
        "no": "localhost,.internal",
    }
    cgi = {"HTTP_PROXY": "http://evil:80", "REQUEST_METHOD": "GET"}  # httpoxy
    assert Settings.from_env(cgi).proxies == {}
    assert Settings().proxies == {}


def test_a_proxy_setting_is_refused_without_showing_its_password() -> None:
    for url, problem in (
        ("socks5://u:hunter2@proxy:1080", "plain HTTP only"),
        ("http://u:hunter2@proxy:99999", "port"),
        ("http://u:hunter2@:3128", "a proxy URL"),
    ):
        with pytest.raises(SettingError, match=problem) as refused:
            Settings.from_env({"https_proxy": url})
        assert "hunter2" not in str(refused.value) and "HTTPS_PROXY" in str(refused.value)
    assert "hunter2" not in repr(Settings.from_env({"HTTPS_PROXY": "http://u:hunter2@p:1"}))


def test_a_default_budget_past_a_trillion_dollars_is_refused() -> None:
    # BUDGET_USD=1e308 was taken, and every request answered 500 (its micro-dollars
    # overflowed a float).
    assert Settings.from_env({"BUDGET_USD": "1000000000000"}).budget_usd == 1e12
    with pytest.raises(SettingError) as refused:
        Settings.from_env({"BUDGET_USD": "1e308"})
    assert str(refused.value) == (
        "BUDGET_USD: must be a positive number of dollars, at most 1000000000000, got '1e308'"
    )


def test_a_worker_count_past_what_any_machine_runs_is_refused() -> None:
    # WORKERS=1000000000000 (QUOTA_ENABLED=false) was taken: the gateway printed "starting:
    # ... 1000000000000 workers" and then zeroed a shared array of 8 bytes per worker, its
    # memory growing by the gigabyte until the kernel killed it, instead of a start error.
    assert Settings.from_env({"WORKERS": "1024", "QUOTA_ENABLED": "false"}).workers == 1024
    for count in ("1025", "1000000000000"):
        with pytest.raises(SettingError) as refused:
            Settings.from_env({"WORKERS": count, "QUOTA_ENABLED": "false"})
        assert str(refused.value) == (
            "WORKERS: must be a number of processes from 0 to 1024 (0: one per core), "
            f"got '{count}'"
        )


@pytest.mark.parametrize("host", [",", " , ,"])
def test_a_server_host_of_commas_alone_is_refused(host: str) -> None:
    # SERVER_HOST="," was taken: the gateway said 'listening on http://,:8080' and listened
    # on no socket at all.
    with pytest.raises(SettingError, match="SERVER_HOST: must be an address"):
        Settings.from_env({"SERVER_HOST": host})
    assert Settings.from_env({"SERVER_HOST": "0.0.0.0,::,"}).server_host == "0.0.0.0,::,"


@pytest.mark.parametrize(
    "host", ["0.0.0.0:8080", "http://0.0.0.0", "localhost:9000", "0.0.0.0,127.0.0.1:80", "[::1]"]
)
def test_a_server_host_with_a_port_or_a_scheme_is_refused_by_check_too(host: str) -> None:
    # SERVER_HOST=0.0.0.0:8080 passed --check ('would start', exit 0); the start then failed
    # with "cannot be resolved (Name or service not known)", naming no port ("[::1]" too: an
    # IPv6 address is written bare here).
    keys = str(Path(__file__).resolve().parents[2] / "keys.example.json")
    [problem] = check([], {"SERVER_HOST": host}, keys).problems
    assert problem.startswith("SERVER_HOST: ") and "SERVER_PORT" in problem, problem
    for fine in ("::", "::1", "0.0.0.0,::", "fe80::1%eth0", "gateway.local"):
        assert Settings.from_env({"SERVER_HOST": fine}).server_host == fine


def test_a_setting_written_in_lower_case_is_warned_of_not_silently_ignored() -> None:
    # quota_limit=5 (a compose file's or a shell's habit) was ignored without a word: the
    # limit stayed the default 100. Only upper-case names near a setting were warned of.
    from proxy.runtime.check import lookalikes

    said = lookalikes(
        {"quota_limit": "5", "Redis_Url": "redis://r", "QUOTA_LIMTI": "5", "http_proxy": "x"}
    )
    assert len(said) == 3, said
    assert any(
        line.startswith("quota_limit is not a setting") and "QUOTA_LIMIT" in line for line in said
    )
    assert any("Redis_Url" in line and "REDIS_URL" in line for line in said)


def test_a_setting_written_short_of_its_full_name_is_warned_of(tmp_path: Path) -> None:
    # LOG_TO_FILE=true LOG_FILE=/var/log/gateway.jsonl was taken without a word: the log went
    # to interactions.jsonl in the working directory. KEYS_FILE likewise left keys.json in
    # use. A name cut short of a setting's at a '_' is too far from it for the spelling check.
    found = check(
        [],
        {
            "LOG_FILE": str(tmp_path / "gateway.jsonl"),
            "KEYS_FILE": "/etc/llm/keys.json",
            "QUOTA_WINDOW": "60",
            "LOG_TO_FILE": "false",
        },
        str(Path(__file__).resolve().parents[2] / "keys.example.json"),
    )
    said = [line for line in found.warnings if "is not a setting" in line]
    assert said == [
        "KEYS_FILE is not a setting and is ignored: did you mean KEYS_FILE_PATH or "
        "KEYS_FILE_WATCH?",
        "LOG_FILE is not a setting and is ignored: did you mean LOG_FILE_PATH?",
        "QUOTA_WINDOW is not a setting and is ignored: did you mean QUOTA_WINDOW_SECONDS?",
    ]
    # A word of its own, or a setting's whole first word, is no setting cut short.
    from proxy.runtime.check import lookalikes

    assert lookalikes({"LOG": "1", "SERVER": "x", "PATH": "/bin", "KEYS_STORE": "file"}) == []


def test_a_keys_store_secret_that_takes_no_effect_is_warned_of() -> None:
    # A KEYS_STORE_SECRET with keys.json as the store was taken without a word: the operator
    # believed the real keys encrypted at rest.
    from proxy.runtime.check import ignored_settings

    secret = "x" * 32
    said = ignored_settings(Settings.from_env({"KEYS_STORE_SECRET": secret}))
    assert len(said) == 1 and "KEYS_STORE=redis" in said[0] and secret not in said[0]
    # The image sets LOG_FILE_PATH for whoever turns LOG_TO_FILE on: no warning.
    assert ignored_settings(Settings.from_env({"LOG_FILE_PATH": "/app/logs/x.jsonl"})) == []


@pytest.mark.parametrize(
    ("argv", "variable"),
    [
        (["--admin-token", "a" * 32], "ADMIN_TOKEN"),
        (["--metrics-token=" + "m" * 32], "METRICS_TOKEN"),
        (["--redis-url", "redis://:hunter2-hunter2@redis:6379/0"], "REDIS_URL"),
    ],
)
def test_a_secret_given_as_a_flag_draws_a_warning(
    tmp_path: Path, argv: list[str], variable: str
) -> None:
    # Every local user reads a process's command line (ps, /proc/<pid>/cmdline), and so do
    # process listings in monitoring: the token that exports every real key was in them.
    keys = tmp_path / "keys.json"
    keys.write_text(
        '{"virtual_keys": {"vk_flags_0123456789": {"provider": "openai", "api_key": "sk-x"}}}'
    )
    found = check(argv, {}, str(keys))
    said = [line for line in found.warnings if line.startswith(argv[0].partition("=")[0])]
    assert len(said) == 1 and variable in said[0]
    secret = argv[-1].partition("=")[2] if "=" in argv[-1] else argv[-1]
    assert all(secret not in line and "hunter2" not in line for line in found.warnings)


def test_a_redis_url_without_a_password_or_a_secret_in_the_environment_draws_no_such_warning(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        '{"virtual_keys": {"vk_flags_0123456789": {"provider": "openai", "api_key": "sk-x"}}}'
    )
    found = check(["--redis-url", "redis://redis:6379/0"], {"ADMIN_TOKEN": "a" * 32}, str(keys))
    assert not [line for line in found.warnings if "command line" in line]


@pytest.mark.parametrize(
    ("files", "quota_cores"),
    [
        ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2: `docker run --cpus 1`
        ({"cpu.max": "50000 100000\n"}, 1),  # half a core still runs one worker
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files (macOS, a host without them)
    ],
)
def test_workers_0_counts_the_cores_a_containers_cpu_limit_leaves(
    tmp_path: Path, files: dict[str, str], quota_cores: int | None
) -> None:
    # WORKERS=0 ran os.cpu_count() workers: a container limited to 2 CPUs on a 64-core
    # node started 64, each with its memory and Redis connections, sharing 2 cores.
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    allowed = len(os.sched_getaffinity(0))
    expected = allowed if quota_cores is None else min(allowed, quota_cores)
    assert usable_cores(tmp_path) == expected


def test_workers_0_is_never_more_than_the_cpus_the_process_may_run_on(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("6400000 100000\n")  # a quota of 64 CPUs
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))
