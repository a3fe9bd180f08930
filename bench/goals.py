"""The benchmark goals, judged from one run's rows: memory and time of ``ours`` against the
alternatives, for scoring and for the policy update. Times are compared by their medians over
at least 3 interleaved repeats; a verdict says when the min–max ranges overlap (the ordering is
then within the machine's noise)."""

from __future__ import annotations

GOAL_N = {"cpu": 4096, "cuda": 16384}  # the sizes the scoring goals are judged at
MIN_REPEATS = 3  # timed calls a time goal needs before its verdict counts
UPDATE_TITLE = {"update": "update (d/d hidden)", "update_w": "update (d/d hidden, d/d weight)"}


def _ok(rows, **kw) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r[k] == v for k, v in kw.items())]


def _one(rows, **kw):
    got = _ok(rows, **kw)
    return got[0] if got else None


def _times(x) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def spread(r: dict) -> str:
    """'1.234 s [1.100–1.500] (n=3)': median, min–max and the number of timed calls."""
    return (f"{r['time_median_s']:.3f} s [{r['time_min_s']:.3f}–{r['time_max_s']:.3f}] "
            f"(n={r['repeats']})")


def _overlap(a: dict, b: dict) -> bool:
    return a["time_min_s"] <= b["time_max_s"] and b["time_min_s"] <= a["time_max_s"]


def time_goal(ours: dict, rival: dict, limit: float, at: str, verdict) -> tuple[str, str]:
    """(measured, verdict) for ``median(ours) ≤ limit × median(rival)``."""
    ratio = ours["time_median_s"] / rival["time_median_s"]
    cpu = (ours["cpu_median_s"] / rival["cpu_median_s"]
           if ours.get("cpu_median_s") and rival.get("cpu_median_s") else None)
    measured = (f"{at}: ours {spread(ours)} ÷ {rival['impl']} {spread(rival)} = "
                f"{ratio:.2f}× wall" + (f", {_times(cpu)} CPU time" if cpu else ""))
    v = verdict(ratio <= limit)
    if min(ours["repeats"], rival["repeats"]) < MIN_REPEATS:
        v += f" (fewer than {MIN_REPEATS} repeats: not reliable)"
    return measured, v + (" (ranges overlap)" if _overlap(ours, rival) else "")


def _update_goals(rows: list[dict], device: str, d) -> list[tuple[str, str, str]]:
    """Policy-update time (and, vs the fused rivals, memory) at the largest N run."""
    out = []
    rivals = ({"naive": 0.9, "trl": 1.0} if device == "cpu"
              else {"liger_flce": 1.0, "trl": 1.0})
    for workload in ("update", "update_w"):
        wrows = [r for r in rows if r["workload"] == workload]
        dd = d if d in {r["d"] for r in _ok(wrows, impl="ours")} else min(
            (r["d"] for r in _ok(wrows, impl="ours")), default=None)
        n = max((r["n"] for r in _ok(wrows, impl="ours", d=dd)), default=None)
        if n is None:
            continue
        at = f"{workload}, N = {n}, D = {dd}"
        ours = _one(wrows, impl="ours", n=n, d=dd)
        for rival, limit in rivals.items():
            other = _one(wrows, impl=rival, n=n, d=dd)
            name = (("CPU " if device == "cpu" else "GPU: ") + f"{UPDATE_TITLE[workload]}: "
                    + (f"ours ≤ {limit}× {rival} time" if rival == "naive"
                       else f"ours ≤ {rival}, memory ≤ 1.05×"))
            if other is None:
                out.append((name, f"{rival} not measured at {at}", "not measured"))
                continue
            measured, verdict = time_goal(ours, other, limit, at,
                                          lambda ok: "met" if ok else "MISSED")
            if rival != "naive":  # the fused rivals: no more memory either
                m = ours["mem_mib"] / max(other["mem_mib"], 1e-9)
                measured += f"; memory {m:.2f}× of {rival}"
                if m > 1.05 and verdict.startswith("met"):
                    verdict = "MISSED (memory)" + verdict[3:]
            out.append((name, measured, verdict))
    return out


def goals(rows: list[dict], device: str) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for each benchmark goal that this run can judge."""
    out = []
    scoring = [r for r in rows if r["workload"] == "scoring"]
    ns = sorted({r["n"] for r in _ok(scoring)})
    goal_n = GOAL_N[device]
    n = goal_n if goal_n in ns else (ns[-1] if ns else None)
    d = min({r["d"] for r in _ok(scoring)}, default=None)
    at = f"scoring, N = {n}, D = {d}" + ("" if n == goal_n else f" (goal size {goal_n} not run)")

    def verdict(ok: bool) -> str:
        return ("met" if ok else "MISSED") if n == goal_n else "n/a: goal size not run"
    ours = _one(scoring, impl="ours", n=n, d=d) if n else None
    naive = _one(scoring, impl="naive", n=n, d=d) if n else None
    if ours and naive:
        saving = naive["mem_mib"] / max(ours["mem_mib"], 1e-9)
        out.append(("Memory: ours ≥ 50× less than naive",
                    f"{at}: {naive['mem_mib']:,.0f} MiB ÷ {ours['mem_mib']:,.1f} MiB = "
                    f"{saving:,.1f}×",
                    verdict(saving >= 50)))
        others = [r for r in _ok(scoring, n=n, d=d) if r["impl"] != "ours"]
        worse = [r for r in others if r["mem_mib"] <= ours["mem_mib"]]
        out.append(("Memory: ours less than every other implementation",
                    "; ".join(f"{r['impl']} {r['mem_mib']:,.1f} MiB "
                              f"({r['mem_mib'] / max(ours['mem_mib'], 1e-9):,.1f}×)"
                              for r in others),
                    verdict(not worse) + (" (" + ", ".join(r["impl"] for r in worse) + ")"
                                          if worse else "")))
    else:
        out.append(("Memory goals", f"ours or naive not measured at {at}", "not measured"))
    if device == "cpu":
        trl = _one(scoring, impl="trl", n=n, d=d) if n else None
        if ours and naive:
            across = ", ".join(
                f"N={m}: {_times(r['time_vs_naive'])}" for m in ns
                if (r := _one(scoring, impl="ours", n=m, d=d)) and r.get("time_vs_naive"))
            measured, v = time_goal(ours, naive, 0.9, at, verdict)
            out.append(("CPU scoring time: ours ≤ 0.9× naive (torch backend)",
                        f"{measured} (wall, all N: {across})", v))
        if ours and trl:
            out.append(("CPU scoring time: ours ≤ TRL chunked ×3",
                        *time_goal(ours, trl, 1.0, at, verdict)))
        out += _update_goals(rows, device, d)
        out.append(("GPU goals (≥ 70% of bare-matmul throughput; update faster than Liger, TRL)",
                    "no GPU on this machine: run bench/gpu.sh", "not measured"))
    else:
        floor = _one(scoring, impl="floor", n=n, d=d) if n else None
        if ours and floor:
            frac = floor["time_median_s"] / ours["time_median_s"]
            out.append(("GPU: scoring ≥ 70% of bare-matmul throughput", f"{at}: {frac:.0%}",
                        verdict(frac >= 0.7)))
        out += _update_goals(rows, device, d)
    return out
