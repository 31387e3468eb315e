"""Benchmark 7 — reconnect: how soon the daemon is connected again once the backend is back
(after a 1-s blip, after a long outage), and how many connection attempts it makes while the
backend is down.

Two methods, both reported:
- measured: real daemon and simulated-backend processes; the reconnect time runs from the
  new backend printing "listening" to it accepting the daemon's handshake;
- simulated: the daemon's own `ReconnectWait` (tenacity full-jitter backoff) and
  `CircuitBreaker` classes driven by a virtual clock, mirroring `Link.run`, Monte Carlo over
  many runs (no sleeping): attempts in 5 minutes and reconnect delays with the defaults.
"""

from __future__ import annotations

import math
import random
import time

from tenacity import RetryCallState

from bench.common import Context, Row, Section, median, percentile
from bench.procs import DaemonProc, SimProc, free_port
from kimi_syncd.backoff import ConnectionFailed, Failure, ReconnectWait
from kimi_syncd.breaker import CircuitBreaker
from kimi_syncd.config import Settings

# -- the schedule, simulated -----------------------------------------------------------------


def simulate(
    settings: Settings,
    down_until: float,
    window: float,
    *,
    after_healthy: bool,
    rng: random.Random,
) -> tuple[int, float | None]:
    """One run of Link.run against a backend that is down on [0, down_until).

    Returns (attempts made in [0, window), time of the successful connection or None).
    """
    rc, br = settings.reconnect, settings.breaker
    now = [0.0]
    breaker = CircuitBreaker(
        br.failure_threshold,
        br.cooldown,
        clock=lambda: now[0],
        jitter=lambda c: c * rng.uniform(1.0, 1.25),
    )
    wait = ReconnectWait(rc.initial_delay, rc.max_delay, rc.multiplier, breaker.time_until_allowed)
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    failed = ConnectionFailed(Failure("connection refused"))
    attempts = 0
    if after_healthy:
        now[0] += rng.uniform(0, rc.initial_delay)  # Link.run's pause after a healthy session
    state.attempt_number = 1
    saved = random.getstate()
    random.seed(rng.random())  # tenacity's jitter uses the random module
    try:
        # Stop once the window is over and the backend is back (or will not be back in it).
        horizon = window if down_until > window else down_until + 10 * br.cooldown
        while now[0] < horizon:
            while not breaker.allow():
                now[0] += max(breaker.time_until_allowed(), 0.05)
            if now[0] >= horizon:
                break
            if now[0] < window:
                attempts += 1
            if now[0] >= down_until:
                return attempts, now[0]
            breaker.record_failure("connection refused")
            state.set_exception((ConnectionFailed, failed, None))
            now[0] += wait(state)
            state.attempt_number += 1
    finally:
        random.setstate(saved)
    return attempts, None


def schedule_stats(
    settings: Settings, down_for: float, window: float, runs: int, *, after_healthy: bool
) -> dict[str, float]:
    rng = random.Random(42)
    attempts: list[float] = []
    delays: list[float] = []
    for _ in range(runs):
        n, at = simulate(settings, down_for, window, after_healthy=after_healthy, rng=rng)
        attempts.append(n)
        if at is not None:
            delays.append(at - down_for)
    return {
        "attempts_median": median(attempts),
        "attempts_min": min(attempts),
        "attempts_max": max(attempts),
        "delay_median": median(delays) if delays else math.nan,
        "delay_p90": percentile(delays, 0.9) if delays else math.nan,
        "delay_max": max(delays) if delays else math.nan,
    }


# -- measured ---------------------------------------------------------------------------------


def _reconnect_after(sim: SimProc, down: float) -> tuple[SimProc, float]:
    """Stop the backend, keep it down `down` seconds, start it again; returns (new sim, s)."""
    sim.stop()
    time.sleep(down)
    new = SimProc(sim.directory, port=sim.port).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        times = new.control("stats")["handshake_times"]
        if times:
            return new, float(times[0]) - new.up_at
        time.sleep(0.05)
    raise RuntimeError("the daemon did not reconnect within 300 s")


def run(ctx: Context) -> Section:
    sec = Section("reconnect", "7. Reconnect")
    defaults = Settings.model_validate({})
    blip_reps = ctx.pick(2, 5)
    long_reps = ctx.pick(1, 2)
    outage = ctx.pick(8.0, 20.0)
    window = ctx.pick(12.0, 60.0)
    short_env = {
        "KIMI_SYNCD_RECONNECT__MAX_DELAY": "5",
        "KIMI_SYNCD_BREAKER__COOLDOWN": "10",
        "KIMI_SYNCD_BREAKER__MIN_HEALTHY_SECONDS": "1",
    }
    shortened = Settings.model_validate(
        {"reconnect": {"max_delay": 5.0}, "breaker": {"cooldown": 10.0, "min_healthy_seconds": 1}}
    )
    with ctx.scratch("reconnect") as directory:
        # Attempts against a closed port, default settings, in the background meanwhile.
        (directory / "count").mkdir()
        counting = DaemonProc(directory / "count", f"ws://127.0.0.1:{free_port()}/ws").start()
        count_started = time.monotonic()

        blips: list[float] = []
        longs: list[float] = []
        (directory / "d").mkdir()
        sim = SimProc(directory).start()
        d = DaemonProc(directory / "d", sim.url, env=short_env).start()
        try:
            d.wait_connected()
            for _ in range(blip_reps):
                time.sleep(1.5)  # > breaker.min_healthy_seconds: a healthy session
                sim, seconds = _reconnect_after(sim, 1.0)
                blips.append(seconds)
                d.wait_connected()
            ctx.log("  reconnect after a 1-s blip: " + ", ".join(f"{s:.2f}" for s in blips) + " s")
            for _ in range(long_reps):
                time.sleep(1.5)
                sim, seconds = _reconnect_after(sim, outage)
                longs.append(seconds)
                d.wait_connected()
            ctx.log(
                f"  reconnect after a {outage:g}-s outage: "
                + ", ".join(f"{s:.2f}" for s in longs)
                + " s"
            )
        finally:
            d.stop()
            sim.stop()
        remaining = window - (time.monotonic() - count_started)
        if remaining > 0:
            time.sleep(remaining)
        elapsed = time.monotonic() - count_started
        measured_attempts = float(counting.status()["link"]["attempts"])
        counting.stop()

    runs = ctx.pick(300, 2000)
    sim_window = schedule_stats(defaults, 1e9, elapsed, runs, after_healthy=False)
    sim_5min = schedule_stats(defaults, 1e9, 300.0, runs, after_healthy=True)
    sim_blip = schedule_stats(defaults, 1.0, 1.0, runs, after_healthy=True)
    sim_long_default = schedule_stats(defaults, 600.0, 600.0, runs, after_healthy=True)
    sim_blip_short = schedule_stats(shortened, 1.0, 1.0, runs, after_healthy=True)
    sim_long_short = schedule_stats(shortened, outage, outage, runs, after_healthy=True)

    sec.add(
        Row(
            "reconnected after a 1-s blip (measured)",
            "s",
            blips,
            note=f"simulated, same settings: median {sim_blip_short['delay_median']:.2f}, "
            f"p90 {sim_blip_short['delay_p90']:.2f} s",
        )
    )
    sec.add(
        Row(
            f"reconnected after a {outage:g}-s outage (measured, shortened settings)",
            "s",
            longs,
            note=f"simulated, same settings: median {sim_long_short['delay_median']:.2f}, "
            f"p90 {sim_long_short['delay_p90']:.2f}, max {sim_long_short['delay_max']:.2f} s",
        )
    )
    sec.add(
        Row(
            "reconnected after a 1-s blip, defaults (simulated median)",
            "s",
            [sim_blip["delay_median"]],
            note=f"p90 {sim_blip['delay_p90']:.2f}, max {sim_blip['delay_max']:.2f} s",
        )
    )
    sec.add(
        Row(
            "reconnected after a 10-min outage, defaults (simulated median)",
            "s",
            [sim_long_default["delay_median"]],
            note=f"p90 {sim_long_default['delay_p90']:.1f}, max "
            f"{sim_long_default['delay_max']:.1f} s",
        )
    )
    sec.add(
        Row(
            f"connection attempts in {elapsed:.0f} s down, defaults (measured)",
            "attempts",
            [measured_attempts],
            note=f"simulated: median {sim_window['attempts_median']:.0f}, range "
            f"{sim_window['attempts_min']:.0f}–{sim_window['attempts_max']:.0f}",
        )
    )
    sec.add(
        Row(
            "connection attempts while down 5 minutes, defaults (simulated)",
            "attempts",
            [sim_5min["attempts_median"]],
            note=f"range {sim_5min['attempts_min']:.0f}–{sim_5min['attempts_max']:.0f} over "
            f"{runs} runs",
        )
    )
    rc, br = defaults.reconnect, defaults.breaker
    sec.notes += [
        f"Defaults: reconnect.initial_delay={rc.initial_delay:g} s, max_delay={rc.max_delay:g} s,"
        f" multiplier={rc.multiplier:g}; breaker.failure_threshold={br.failure_threshold}, "
        f"cooldown={br.cooldown:g} s (+0–25 % jitter), min_healthy_seconds="
        f"{br.min_healthy_seconds:g} s.",
        "Measured reconnects use shortened settings, stated here: reconnect.max_delay=5 s, "
        "breaker.cooldown=10 s, breaker.min_healthy_seconds=1 s (so that a session of 1.5 s "
        f"counts as healthy); the long outage lasts {outage:g} s. The time runs from the "
        "backend printing 'listening' to its accepting the daemon's handshake.",
        f"Attempts: a daemon with default settings pointed at a closed port, counted through "
        f"`/v1/status` after {elapsed:.0f} s (measured), against {runs} simulated runs of the "
        "same schedule; the 5-minute figure is simulated only.",
    ]
    sec.extra.update(
        {
            "simulated": {
                "window": sim_window,
                "down_5_min": sim_5min,
                "blip_defaults": sim_blip,
                "outage_10_min_defaults": sim_long_default,
                "blip_shortened": sim_blip_short,
                "outage_shortened": sim_long_short,
            }
        }
    )
    return sec
