"""bench/RESULTS.md and its plots, from the figures bench/run.py measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONTENDERS = ("direct", "paddler_sync", "naive", "haproxy", "nginx")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def nonstream_table(data: dict[str, Any]) -> list[str]:
    lines = ["| concurrency | contender | req/s | p50 ms | p99 ms | added p50 ms vs direct | CPU µs/req | RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for conc in ("1", "16", "64"):
        direct = data.get("direct", {}).get(conc, {})
        for name in CONTENDERS:
            cell = data.get(name, {}).get(conc)
            if not cell:
                continue
            added = cell["p50_ms"] - direct.get("p50_ms", 0) if name != "direct" else None
            cpu = cell["cpu_us_per_req"] if name != "direct" else None
            lines.append(f"| {conc} | {name} | {fmt(cell['rps'], 0)} | {fmt(cell['p50_ms'], 3)} | "
                         f"{fmt(cell['p99_ms'], 3)} | {fmt(added, 3)} | {fmt(cpu, 0)} | {fmt(cell['rss_mb'], 1)} |")
    return lines


def shared_table(shared: dict[str, Any]) -> list[str]:
    lines = ["| concurrency | contender | req/s | vs local -w1 | p50 ms | p99 ms | balancer CPU µs/req | "
             "Redis CPU µs/req |", "|---|---|---|---|---|---|---|---|"]
    table = shared["table"]
    for conc in ("16", "64"):
        base = table.get("local -w1", {}).get(conc, {})
        for name in ("local -w1", "redis -w1", "redis -w2"):
            cell = table.get(name, {}).get(conc)
            if not cell:
                continue
            ratio = cell["rps"] / base["rps"] if base.get("rps") else None
            lines.append(f"| {conc} | {name} | {fmt(cell['rps'], 0)} | {fmt(ratio, 2)}× | {fmt(cell['p50_ms'], 3)} | "
                         f"{fmt(cell['p99_ms'], 3)} | {fmt(cell['cpu_us_per_req'], 0)} | "
                         f"{fmt(cell['redis_cpu_us_per_req'], 0)} |")
    trip = shared["round_trip"]
    lines += ["", f"One request's Redis work alone (take + release, from Python without gevent): p50 "
                  f"{trip['p50_us']:.0f} µs, p99 {trip['p99_us']:.0f} µs."]
    return lines


def stream_table(table: dict[str, Any]) -> list[str]:
    lines = ["| contender | events/s | delay p50 ms | p99 ms | max ms | events per recv | TTFB p50 ms | complete | "
             "CPU µs/event | peak RSS MB (largest process) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CONTENDERS:
        r = table.get(name)
        if not r:
            continue
        cpu = r["cpu_us_per_event"] if name != "direct" else None
        lines.append(f"| {name} | {fmt(r['events_per_s'], 0)} | {fmt(r['delay_p50_ms'], 2)} | {fmt(r['delay_p99_ms'], 2)} "
                     f"| {fmt(r['delay_max_ms'], 1)} | {fmt(r['events_per_recv'], 2)} | {fmt(r['ttfb_p50_ms'], 1)} | "
                     f"{fmt(r['complete'], 0)}/{fmt(r['streams'], 0)} | {fmt(cpu, 1)} | {fmt(r['peak_rss_mb'], 1)} "
                     f"({fmt(r.get('peak_worker_rss_mb'), 1)}) |")
    return lines


def sweep_table(sweep: dict[str, Any]) -> list[str]:
    lines = ["| contender | streams | events/s | delay p99 ms | CPU µs/event | complete |", "|---|---|---|---|---|---|"]
    for name, by_streams in sweep.items():
        for streams, r in sorted(by_streams.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {name} | {streams} | {fmt(r['events_per_s'], 0)} | {fmt(r['delay_p99_ms'], 1)} | "
                         f"{fmt(r['cpu_us_per_event'], 1)} | {r['complete']}/{r['streams']} |")
    return lines


def fleet_table(fleet: dict[str, Any]) -> list[str]:
    lines = ["| load | contender | tokens/s | TTFT p50 ms | TTFT p99 ms | end-to-end p99 ms | failed | misroutes |",
             "|---|---|---|---|---|---|---|---|"]
    for load, by_name in fleet["table"].items():
        for name, r in by_name.items():
            lines.append(f"| {load} % | {name} | {fmt(r['tokens_per_s'], 0)} | {fmt(r['ttft_p50_ms'], 0)} | "
                         f"{fmt(r['ttft_p99_ms'], 0)} | {fmt(r['e2e_p99_ms'], 0)} | {fmt(r['failed'], 0)} | "
                         f"{fmt(r['misroutes'], 0)} |")
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    ns = results.get("nonstream", {})
    if ns:
        cpu = ns["paddler_sync"]["16"]["cpu_us_per_req"]
        naive = ns["naive"]["16"]["cpu_us_per_req"]
        added = ns["paddler_sync"]["1"]["p50_ms"] - ns["direct"]["1"]["p50_ms"]
        nginx = ns.get("nginx", {}).get("16", {}).get("cpu_us_per_req", float("nan"))
        rows += [f"| ≤ 400 µs balancer CPU per small request (c=16) | {cpu:.0f} µs (naive proxy {naive:.0f} µs, "
                 f"{naive / cpu:.2f}× ours; nginx {nginx:.0f} µs) | {verdict(cpu <= 400)} |",
                 f"| ≤ +0.4 ms added p50 at concurrency 1 | +{added:.3f} ms | {verdict(added <= 0.4)} |"]
    st = results.get("stream", {}).get("table", {}).get("paddler_sync")
    if st:
        table = results["stream"]["table"]
        same_run = {name: table[name] for name in ("direct", "nginx", "haproxy") if name in table}
        delays = ", ".join(f"{name} {row['delay_p99_ms']:.1f}" for name, row in same_run.items())
        events = ", ".join(f"{name} {row['cpu_us_per_event']:.1f}" for name, row in same_run.items()
                           if name != "direct")
        rows += [f"| relay delay p99 ≤ 5 ms at 100 × 200 events @ 5 ms | {st['delay_p99_ms']:.2f} ms (same run: "
                 f"{delays} ms) | {verdict(st['delay_p99_ms'] <= 5)} |",
                 f"| ≤ 15 µs CPU per event | {st['cpu_us_per_event']:.1f} µs (same run: {events} µs) | "
                 f"{verdict(st['cpu_us_per_event'] <= 15)} |",
                 f"| peak RSS ≤ 60 MB | {st['peak_rss_mb']:.1f} MB for gunicorn's master and worker together; "
                 f"the worker alone {st.get('peak_worker_rss_mb', 0):.1f} MB | {verdict(st['peak_rss_mb'] <= 60)} |"]
        sweep = results["stream"].get("sweep", {}).get("paddler_sync", {})
        if sweep:
            best = max(r["events_per_s"] for r in sweep.values())
            rows.append(f"| ≥ 60,000 events/s before saturation | {best:,.0f} events/s (best of the sweep) | "
                        f"{verdict(best >= 60000)} |")
    buf = results.get("buffer")
    if buf:
        rows.append(f"| {buf['n']:,} waiting requests in ≤ 300 MB, all served FIFO | {buf['rss_peak_mb']:.0f} MB, "
                    f"{buf['ok']:,} served, {buf['lost']} lost, max displacement {buf['max_displacement']} "
                    f"(FIFO dispatch over {buf['drain_slots']} slots allows up to {2 * buf['drain_slots']}) | "
                    f"{verdict(buf['rss_peak_mb'] <= 300 and buf['lost'] == 0 and buf['max_displacement'] <= 2 * buf['drain_slots'])} |")
    fleet = results.get("fleet", {}).get("table", {})
    if fleet:
        mis = sum(r["misroutes"] for by in fleet.values() for n, r in by.items() if n == "paddler_sync")
        rows.append(f"| zero misroutes | {mis} | {verdict(mis == 0)} |")
        if "80" in fleet:
            ours, rr, hap = (fleet["80"][n]["ttft_p99_ms"] for n in ("paddler_sync", "round_robin", "haproxy"))
            rows.append(f"| TTFT p99 at 80 % ≤ HAProxy's and ≥ 30 % better than round robin | {ours:.0f} ms vs "
                        f"HAProxy {hap:.0f} ms, round robin {rr:.0f} ms ({100 * (1 - ours / rr):.0f} % better) | "
                        f"{verdict(ours <= hap and ours <= 0.7 * rr)} |")
        for load in ("95", "110"):
            if load in fleet:
                ours, lc = fleet[load]["paddler_sync"]["tokens_per_s"], fleet[load]["least_connections"]["tokens_per_s"]
                rows.append(f"| tokens/s at {load} % ≥ 97 % of least-connections | {ours:.0f} vs {lc:.0f} "
                            f"({100 * ours / lc:.0f} %) | {verdict(ours >= 0.97 * lc)} |")
    return rows + tenant_targets(results.get("tenants", {}).get("phases", {}))


def tenant_targets(phases: dict[str, Any]) -> list[str]:
    """Section 7's targets: the chat beside the batch users, with tenants, against alone and FIFO."""
    if not {"alone", "fifo", "tenants"} <= set(phases):
        return []
    alone, fifo, ours = (phases[name] for name in ("alone", "fifo", "tenants"))
    p99, limit = ours["chat_ttft_p99_ms"], min(2 * alone["chat_ttft_p99_ms"] + 300, 0.25 * fifo["chat_ttft_p99_ms"])
    ratio = ours["tokens_per_s"] / fifo["tokens_per_s"]
    return [f"| tenants: chat TTFT p99 ≤ 2× alone + 0.3 s and ≤ 0.25× FIFO's | {p99:.0f} ms (alone "
            f"{alone['chat_ttft_p99_ms']:.0f} ms, FIFO {fifo['chat_ttft_p99_ms']:.0f} ms) | {verdict(p99 <= limit)} |",
            f"| tenants: the 2-client user's share of batch tokens ≥ 40 % | {100 * ours['modest_share']:.0f} % (FIFO "
            f"{100 * fifo['modest_share']:.0f} %) | {verdict(ours['modest_share'] >= 0.4)} |",
            f"| tenants: tokens/s within 3 % of FIFO's | {ours['tokens_per_s']:.0f} vs {fifo['tokens_per_s']:.0f} "
            f"({100 * ratio:.1f} %) | {verdict(ratio >= 0.97)} |",
            f"| tenants: 0 failed requests | {ours['failed']} (FIFO {fifo['failed']}) | {verdict(ours['failed'] == 0)} |"]


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    ns = results.get("nonstream")
    if ns:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name in CONTENDERS:
            if name in ns:
                concs = sorted(ns[name], key=int)
                ax.plot([int(c) for c in concs], [ns[name][c]["rps"] for c in concs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s")
        ax.set_title("Non-streaming small requests")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "plot-nonstream.png", dpi=110)
        made.append("plot-nonstream.png")
    sweep = results.get("stream", {}).get("sweep")
    if sweep:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        for name, by in sweep.items():
            streams = sorted(by, key=int)
            left.plot([int(s) for s in streams], [by[s]["events_per_s"] for s in streams], marker="o", label=name)
            right.plot([int(s) for s in streams], [by[s]["delay_p99_ms"] for s in streams], marker="o", label=name)
        left.set_xlabel("concurrent streams")
        left.set_ylabel("events/s relayed")
        right.set_xlabel("concurrent streams")
        right.set_ylabel("relay delay p99 (ms)")
        right.set_yscale("log")
        left.legend()
        fig.tight_layout()
        fig.savefig(folder / "plot-stream-sweep.png", dpi=110)
        made.append("plot-stream-sweep.png")
    fleet = results.get("fleet", {}).get("table")
    if fleet:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        loads = sorted(fleet, key=int)
        names = list(next(iter(fleet.values())))
        for name in names:
            left.plot([int(x) for x in loads], [fleet[x][name]["ttft_p99_ms"] for x in loads], marker="o", label=name)
            right.plot([int(x) for x in loads], [fleet[x][name]["tokens_per_s"] for x in loads], marker="o", label=name)
        left.set_xlabel("offered load (% of capacity)")
        left.set_ylabel("TTFT p99 (ms)")
        left.set_yscale("log")
        right.set_xlabel("offered load (% of capacity)")
        right.set_ylabel("tokens/s delivered")
        left.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "plot-fleet.png", dpi=110)
        made.append("plot-fleet.png")
    return made


def models_section(m: dict[str, Any]) -> list[str]:
    heavy, light = m["heavy"], m["light"]
    lines = ["## 3b. Two models: a saturated one must not delay a light one", "",
             f"Model `heavy`: {heavy['servers']} simulated servers × {heavy['slots']} slots at {heavy['speed']:g} "
             f"tokens/s, offered {heavy['load']:.0%} of its capacity ({heavy['tokens']}-token answers); model `light`: "
             f"{light['servers']} server × {light['slots']} slots at {light['speed']:g} tokens/s, offered "
             f"{light['load']:.0%} ({light['tokens']}-token answers). Open-loop Poisson trace of {m['seconds']:g} s, "
             f"seed {m['seed']}, medians of {m['reps']} runs (bench/models.py). `one_shared_queue` is the same "
             "balancer with `--no-per-model-queues`. Misrouted: requests a server of the other model served "
             "(each simulator's count against the requests sent for its model).", "",
             "| contender | light TTFT p50 ms | light TTFT p99 ms | heavy TTFT p99 ms | failed | misrouted |",
             "|---|---|---|---|---|---|"]
    for name, row in m["table"].items():
        lines.append(f"| {name} | {fmt(row['light_ttft_p50_ms'], 0)} | {fmt(row['light_ttft_p99_ms'], 0)} | "
                     f"{fmt(row['heavy_ttft_p99_ms'], 0)} | {fmt(row['light_failed'] + row['heavy_failed'], 0)} | "
                     f"{fmt(row['misrouted'], 0)} |")
    per_model = m["table"].get("per_model_queues", {}).get("light_ttft_p99_ms")
    shared = m["table"].get("one_shared_queue", {}).get("light_ttft_p99_ms")
    if per_model and shared:
        lines += ["", f"The light model's TTFT p99: {fmt(per_model, 0)} ms with per-model queues against "
                      f"{fmt(shared, 0)} ms behind one shared queue ({shared / per_model:,.0f}× shorter)."]
    return [*lines, ""]


def multiturn_table(table: dict[str, Any]) -> list[str]:
    lines = ["| rule | prompt recomputed (turns ≥ 2) | TTFT p50 ms | TTFT p99 ms | tokens/s | failed |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['recomputed']:.0%} | {fmt(row['ttft_p50_ms'], 0)} | "
                     f"{fmt(row['ttft_p99_ms'], 0)} | {fmt(row['tokens_per_s'], 1)} | {fmt(row['failed'], 0)} |")
    first, rr, slots = table.get("first-token"), table.get("round-robin"), table.get("slots")
    if first and rr and slots:
        lines += ["", f"first-token against round-robin: TTFT p50 {first['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f}×, "
                      f"against slots {first['ttft_p50_ms'] / slots['ttft_p50_ms']:.2f}×; tokens/s "
                      f"{first['tokens_per_s'] / rr['tokens_per_s']:.2f}× round-robin's. Targets: recomputed ≤ 25 % "
                      f"({verdict(first['recomputed'] <= 0.25)}), TTFT p50 ≤ 0.5× round-robin's "
                      f"({verdict(first['ttft_p50_ms'] <= 0.5 * rr['ttft_p50_ms'])}) and below slots' "
                      f"({verdict(first['ttft_p50_ms'] < slots['ttft_p50_ms'])}), no loss of tokens/s "
                      f"({verdict(first['tokens_per_s'] >= 0.95 * rr['tokens_per_s'])})."]
    return lines


def multiturn_section(m: dict[str, Any]) -> list[str]:
    sim, real = m["shape"], m["real_shape"]
    out = ["## 3c. Multi-turn conversations: prompt-cache affinity", "",
           f"{sim['conversations']} conversations side by side, {sim['turns']} turns each; each has its own "
           f"{sim['system_words']}-word system prompt and re-sends its whole history every turn, llama.cpp's answers "
           f"in it, streamed, {sim['max_tokens']} tokens per answer (bench/multiturn.py, bench/conversation_client.py)."
           " Recomputed: the prompt tokens llama.cpp really computed on turns after the first (`timings.prompt_n` "
           "over `usage.prompt_tokens`); TTFT over those turns; tokens/s over the run. The same balancer with each "
           "`--policy`, on freshly started servers.", "",
           f"Simulated: {sim['servers']} servers × {sim['slots']} slots, 2 ms of prefill per uncached prompt token, "
           "60 tokens/s, prompt cache on.", "", *multiturn_table(m["simulated"]), ""]
    if "real" in m:
        out += [f"Real llama-servers: {real['servers']} b4748 servers × {real['slots']} slots, the slow model, "
                f"{real['conversations']} conversations × {real['turns']} turns.", "", *multiturn_table(m["real"]), ""]
    elif "real_skipped" in m:
        out += [f"Real llama-servers: skipped ({m['real_skipped']}).", ""]
    return out


def real_table(real: dict[str, Any]) -> list[str]:
    rows = ["| scenario | contender | tokens/s | vs least-conn. | p50 ms | p99 ms | slots used per decode (of 4) | "
            "samples with a request deferred in llama.cpp | most deferred at once | balancer CPU s/s | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, cells in real["scenarios"].items():
        base = cells["least_connections"]["tokens_per_s"]
        for name, c in cells.items():
            if name == "runs":
                continue
            rows.append(f"| {scenario} | {name} | {c['tokens_per_s']:,.0f} | {c['tokens_per_s'] / base:.2f}× | "
                        f"{c['p50_ms']:,.0f} | {c['p99_ms']:,.0f} | {c['occupancy']:.2f} | "
                        f"{100 * c['deferred_share']:.0f} % | {c['deferred_max']:.0f} | {c['cpu_s_per_s']:.2f} | "
                        f"{c['errors']:.0f} |")
    rows += ["", "Every run (tokens/s, in run order):", ""]
    rows += [f"- {scenario}: " + "; ".join(f"{name} {', '.join(f'{v:,.0f}' for v in runs)}"
                                           for name, runs in cells["runs"].items())
             for scenario, cells in real["scenarios"].items()]
    return rows


def swaps_section(w: dict[str, Any]) -> list[str]:
    lines = ["## 6. Model swaps under streaming load (the supervisor)", "",
             f"Two servers, each run by its agent (`paddler-sync agent --supervise -- ...`), {w['slots']} slots each; "
             f"{w['clients']} closed-loop streaming clients (50 tokens per answer: never more than one server's slots, "
             "so one server carries the load while the other swaps). After a "
             f"{w['baseline_s']:g} s baseline, a fleet-wide desired state swaps the model tiny → slow, then back, with "
             "`--max-unavailable 1`; the baseline and the swaps are in the same run. Deferred: llama.cpp's "
             "`requests_deferred`, sampled every 0.1 s on both servers. Longest extra wait: the slowest first token "
             "during the swaps less the baseline's median. Recovery: after the load, one server is killed with "
             "SIGKILL; the seconds until its agent has it serving again (the supervisor's `recovered_in`). "
             "bench/swap.py.", "",
             "| servers | requests | failed | deferred (max) | TTFT p50 / p99 before, ms | TTFT p50 / p99 during "
             "swaps, ms | longest extra wait, ms | swaps took, s | each server's swap, s | recovery after kill -9, s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {"simulated (2 s load time)": w["simulated"],
            **{f"real llama-server {k}": v for k, v in w["real"].items() if isinstance(v, dict)}}
    for name, r in rows.items():
        lines.append(f"| {name} | {r['requests']} | {r['failed']} | {r['deferred_max']:.0f} | "
                     f"{fmt(r['base_p50_ms'], 0)} / {fmt(r['base_p99_ms'], 0)} | {fmt(r['swap_p50_ms'], 0)} / "
                     f"{fmt(r['swap_p99_ms'], 0)} | {fmt(r['longest_extra_wait_ms'], 0)} | "
                     f"{', '.join(f'{s:.1f}' for s in r['swap_seconds'])} | "
                     f"{', '.join(f'{s:.1f}' for s in r['server_apply_seconds'])} | "
                     f"{r['recovery_after_kill_s']:.1f} |")
    if "skipped" in w["real"]:
        lines += ["", f"Real llama-servers: skipped ({w['real']['skipped']})."]
    return [*lines, ""]


def tenants_section(t: dict[str, Any]) -> list[str]:
    from bench.tenants import table

    return ["## 7. Many users, one fleet: a chat beside batch jobs (tenants)", "",
            f"Measured {t.get('measured', '')} (`bench/run.py --only tenants`). Two real llama-servers ({t['build']}, "
            "the slow random-weight model, `-np 2` each: four slots). The chat client sends a streamed 4-token "
            "answer every 0.7 s; the batch users run closed loops of 64-token non-streaming requests: a flood of 12 "
            "clients and a modest user of 2. Three phases on the same servers, each on a fresh balancer: the chat "
            "alone; chat and batch with no tenants (one FIFO queue); the same with `--tenants` (chat priority 10, "
            "one reserved slot; both batch users priority 0, weight 1). The two loaded phases ran "
            f"{t['reps']} times each, in turns, {t['seconds']:g} s each (medians; failures and chat requests "
            "summed). Time to first token is the chat client's, to its first event. The 2-client user's share is of "
            "the batch users' generated tokens (llama.cpp's `tokens_predicted`). bench/tenants.py.", "",
            table(t), "",
            "The reserved slot is idle whenever the chat is ("
            f"{t['phases']['tenants']['occupancy']:.2f} slots busy per decode step with tenants against "
            f"{t['phases']['fifo']['occupancy']:.2f} without), yet the tokens per second are about FIFO's: with one compute "
            "thread, the slow model's decode here is compute-bound, and a server makes about as many tokens with one "
            "sequence as with two. Where batching scales (a GPU), an idle reserved slot costs up to its share of "
            "the fleet's throughput while its tenant is idle: that is what `reserved_slots` buys the chat's first "
            "token with. The small user's share stays under half because it has no request waiting while its two "
            "run: when one ends, the slot goes to a waiting flood request before the small user's next one arrives "
            "(the rule never holds a slot idle for a tenant that is not waiting).", ""]


def faults_section(f: dict[str, Any]) -> list[str]:
    from bench.faults import table

    return ["## 8. Faults on real llama-servers", "",
            f"Measured {f.get('measured', '')} (`bench/run.py --only faults`, bench/faults.py), {f['seconds']:g} s per "
            "build. Two llama-servers (the tiny random-weight model, `-np 2`), their agents, one balancer whose "
            "ledger is in Redis behind Sentinel (a master, a replica, three Sentinels), 10 clients in closed loops "
            "(streamed and non-streamed `/completion`, 20 to 80 tokens). Every 12 s one fault, in turn: a "
            "llama-server killed with SIGKILL (started again 1 s later), one paused 3 s (SIGSTOP), an agent killed "
            "(started again 1 s later), `kill -HUP` of the balancer, the Redis master killed (Sentinel fails over). "
            "Each request is counted for the last fault before it ended (`none`: before the first). `cut`: a "
            "stream that had started on a server that was killed, ended visibly; `failed`: any other error "
            "answer; `hung`: no answer in 120 s. Whole again: from the fault's start (a pause lasts 3 s, a restart "
            "waits 1 s) until both agents are ready and Redis answers.", "", table(f), ""]


def write_report(results: dict[str, Any], folder: Path) -> None:
    m = results["machine"]
    out = ["# Benchmark results", "",
           f"Measured {results['date']} with `{results['command']}` on {m['cpus']} CPUs ({m['cpu_model']}), "
           f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}. Load generators, proxies and simulated "
           "llama.cpp servers share these cores, so ratios mean more than absolute figures. Each table shows medians "
           "of interleaved repetitions (contenders rotate within each repetition). Regenerate with `make bench` "
           "(`make bench-quick` for a shorter run).", ""]
    out += ["## Targets", "", *targets(results), ""]
    if "nonstream" in results:
        out += ["## 1a. Proxy overhead: non-streaming small requests", "", "`wrk -t1 --latency`, POST /completion (n_predict 1) to two zero-delay simulators; `direct` hits one " "simulator. Every proxy runs one worker or thread. CPU is the contender's process tree over the run.", "", *nonstream_table(results["nonstream"]), "", "![non-streaming](plot-nonstream.png)", ""]
    if "stream" in results:
        out += ["## 1b. Proxy overhead: streaming", "",
                "100 concurrent streams × 200 events at 5 ms (simulators at 200 tokens/s stamping each event with "
                "`time.monotonic_ns()`); delay = client receipt − simulator stamp.", ""]
        out += [*stream_table(results["stream"]["table"]), "", "Sweep to saturation (200 events per stream):", ""]
        out += [*sweep_table(results["stream"]["sweep"]), "", "![streaming sweep](plot-stream-sweep.png)", ""]
    if "buffer" in results:
        b = results["buffer"]
        out += ["## 2. The buffer at scale", "",
                f"{b['n']:,} clients each send one request to a balancer with no agent; all wait in the buffer. Then a "
                f"simulator with {b['drain_slots']} slots and its agent appear, and the queue drains.", "",
                "| figure | value |", "|---|---|",
                f"| balancer RSS before / while {b['n']:,} wait / peak | {b['rss_idle_mb']:.0f} / "
                f"{b['rss_waiting_mb']:.0f} / {b['rss_peak_mb']:.0f} MB |",
                f"| memory per waiting request | {b['kb_per_waiting_request']:.1f} KB |",
                f"| balancer CPU while they wait | {b['cpu_while_waiting_percent']:.1f} % of a core |",
                f"| time to drain them all once slots appear | {b['drain_s']:.1f} s |",
                f"| served / lost | {b['ok']:,} / {b['lost']} |",
                f"| order: largest gap between arrival and completion rank | {b['max_displacement']} (with "
                f"{b['drain_slots']} requests running at once, FIFO dispatch keeps it within about "
                f"{2 * b['drain_slots']}; any overtaking in the queue would show as hundreds) |",
                f"| requests that waited inside the simulator | {b['simulator_deferred']} |", ""]
    if "fleet" in results:
        f = results["fleet"]
        out += ["## 3. Fleet efficiency", "",
                f"Six simulated servers, (slots, tokens/s per slot) = {f['fleet']}, about "
                f"{f['capacity_tokens_per_s']:.0f} tokens/s in all; prompt cache on; 0.5 ms per uncached prompt token. "
                f"Open-loop Poisson trace of {f['seconds']:g} s per load, seed {f['seed']} (bench/fleet.py documents the "
                "mix). Contenders: paddler_sync (its default `first-token` rule: slot-aware, prefill, speed and "
                "prompt-cache aware, requests wait in the balancer); round_robin and "
                "least_connections (the same balancer with the slot-blind policies: excess waits inside llama.cpp); "
                "haproxy (`leastconn`, `maxconn` = slots, its own queue); paddler_1x (Paddler 1.x's rule: reports "
                "every 10 s, preemptive counting in between, no buffer, so a request with no idle slot fails). "
                "Misroutes are requests that waited inside a busy simulator (counted by the simulators).", ""]
        out += [*fleet_table(f), "", "![fleet](plot-fleet.png)", ""]
    if "models" in results:
        out += models_section(results["models"])
    if "multiturn" in results:
        out += multiturn_section(results["multiturn"])
    if "shared" in results:
        out += ["## 4. The ledger shared in Redis: -w 2 against -w 1", "",
                "The same wrk load as 1a against the in-process ledger with one worker, the Redis ledger with one "
                "worker (what the round trips cost) and the Redis ledger with two workers (what a second core "
                "buys on this 2-core machine, which also runs wrk, Redis and the simulators). Redis CPU is "
                "redis-server's own per request.", "", *shared_table(results["shared"]), ""]
    if "real" in results and "scenarios" in results["real"]:
        r = results["real"]
        out += ["## 5. Real llama-servers: throughput against least-connections and round robin", "",
                f"Two real `llama-server` ({r['build']}) with `-np 4 -t 1 --threads-http 80`, the random-weight "
                "models of llama.cpp's make_models.py (tiny: ~2,000 tokens/s for one stream; slow: ~115); "
                "closed-loop clients (bench/closed_loop_client.py) send non-streaming `/completion` with n_predict 64 "
                f"and `ignore_eos`, {r['seconds']:g} s per run, {r['reps']} interleaved runs, medians. "
                "least_connections is the naive gevent proxy of section 1 (slot-blind: llama.cpp queues the excess); "
                "round_robin is paddler_sync with `--policy round-robin`; paddler_sync runs with "
                "`--max-buffered-requests 1024` so 64 clients can wait; paddler_sync_early_5ms adds "
                "`--early-dispatch 5ms` (one request per server handed over 5 ms before a running one is "
                "foreseen to end). Every 250 ms each server's /metrics is read: "
                "`requests_deferred` (requests queued inside llama.cpp) and, from `n_decode_total` and "
                "`n_busy_slots_per_decode`, how many of the 4 slots each decode step used. Everything, the llama "
                "servers included, shares 2 cores, so runs vary by ±20 %.", "", *real_table(r), ""]
    if "swaps" in results:
        out += swaps_section(results["swaps"])
    if "tenants" in results and "phases" in results["tenants"]:
        out += tenants_section(results["tenants"])
    if "faults" in results and "builds" in results["faults"]:
        out += faults_section(results["faults"])
    out += LIMITS
    for name in plots(results, folder):
        if f"({name})" not in "\n".join(out):
            out.append(f"![{name}]({name})")
    (folder / "RESULTS.md").write_text("\n".join(out) + "\n")


LIMITS = """## What limits paddler_sync here, and what it would take

- **Per-request CPU and the relay.** Before, a profile of the worker (py-spy, 200 Hz) showed, per relayed
  SSE event, urllib3's chunked reader (`read_chunked`, `_update_chunk_length`: each chunk parsed line by line in
  Python) at about a quarter of the time, gevent's `sendall` (a `getsockopt` and a clock read on every call) and its
  `recv` (a first read that fails between two events, then a new timer per wait) most of the rest; per small
  request, http.client's header parsing (the stdlib email parser), urllib3's poll of each pooled connection before
  reuse, and gunicorn sending the head and the body in two `send`s. Now the answer is read off the pooled socket
  (paddler_sync/proxy/answer.py: wait, then one `recv`; httptools parses in C; one read-timeout timer per answer),
  the request leaves in one `send`, and gunicorn's response sends its head with the first body bytes and each
  chunk in one `send` (paddler_sync/proxy/response_writer.py). bench/REVISIONS.md has the before/after run. What is
  left per event is the two socket calls, the quick ACK llama.cpp b4748 needs (a `setsockopt`), and gevent's hub:
  a switch into the greenlet and back per wake-up, the part HAProxy and nginx do in C. gunicorn's C request parser
  (`gunicorn[fast]`, package gunicorn-h1c) was tried and measured no gain beyond the noise here, so it is not a
  dependency (gunicorn uses it by itself where it is installed). The upstream's chunked framing is decoded (in C)
  and framed again (one bytes format per event) rather than passed through: passing it through would mean switching
  off gunicorn's `chunked` flag mid-answer, which also decides keep-alive and the final marker, for a saving this
  machine's run-to-run noise cannot show.
- **Streaming.** Each relayed event is one wait, one read and one write; HAProxy and nginx do the same in C. Beyond
  one core, the balancer needs more processes, which the shared Redis ledger makes possible.
- **Which server.** The default rule (the issue's: most free slots, then fewest in flight) fills the servers with the
  most slots first. In this fleet those are the slowest per slot, so at moderate load slot-aware HAProxy
  (`leastconn`: fewest connections, which favours the small, fast servers) can show a lower TTFT p99 and more
  tokens/s, while near and above capacity the two are level and both keep every request out of llama.cpp's queue.
  A speed-aware policy (send to the free slot expected to finish soonest, from the agents' or the responses'
  timings) is the next step, through the `Policy` seam in `paddler_sync/ledger/policy.py`.
- **This machine.** Two cores run the load generator, the simulators and the proxy: at high rates the simulators
  (gevent's pywsgi) take more CPU than the proxy, and `direct` is the simulators' own ceiling.
""".splitlines()
