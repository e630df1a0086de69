#!/usr/bin/env python3
"""Tests of scripts/bench-report: the check fails when docs and records
disagree, and records of a dirty tree never pass or miss.

    python3 scripts/bench_report_test.py    (scripts/test runs it)
"""
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
import unittest

# No scripts/__pycache__: an untracked file would make the tree dirty
# for the next benchmark.
sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
_loader = importlib.machinery.SourceFileLoader("bench_report", os.path.join(HERE, "bench-report"))
_spec = importlib.util.spec_from_loader("bench_report", _loader)
br = importlib.util.module_from_spec(_spec)
_loader.exec_module(br)


def fanout_record(clean=True, scale="full", per_cpu=200_000.0):
    """A record as scripts/bench writes it, from a made-up report."""
    series = [{"unix_secs": 1000 + i, "latency_samples": 10, "p50_ms": 1.0 + i % 3, "p99_ms": 5.0 + i % 7,
               "max_ms": 9.0, "established": min(10_000, 100 * i)} for i in range(600)]
    report = {
        "scenario": "channel", "workers": 1, "params": {"rate": 10, "addr": ["127.0.0.1:1"]},
        "started_unix_ms": 1_000_000, "subscribers": 10_000, "deliveries_received": 1_000_000,
        "deliveries_expected": 1_000_000, "lost": 0, "duplicated": 0, "out_of_order": 0,
        "deliveries_per_second": 100_000.0, "deliveries_per_edge_cpu_second": per_cpu,
        "latency_ms": {"samples": 1_000_000, "p50": 2.0, "p90": 4.0, "p95": 5.0, "p99": 8.0, "p999": 12.0,
                       "max": 30.0},
        "connections": {"attempted": 10_000, "established": 10_000, "failed": 0, "refused_with_503": 0},
        "server": {"edge_cpu_seconds": 5.0},
        "posts": {"count": 100, "each": [{"post": i, "ms_to_last_delivery": 50.0, "delivered": 10_000}
                                         for i in range(100)]},
        "series": series,
    }
    return {
        "format": br.FORMAT, "benchmark": "fanout", "scale": scale, "command": "scripts/bench fanout",
        "argv": [], "commit": "0" * 40, "clean_tree": clean, "dirty_paths": [] if clean else ["edge/src/x.rs"],
        "started_utc": "2026-12-05 00:00 UTC", "duration_secs": 10, "exit_status": 0, "error": None,
        "machine": {"cpu": "test", "cores": 2}, "settings": ["open files: 20000"], "memory": None, "extra": {},
        "report": br.compact_report(report), "series": br._downsample(report["series"], 1000),
        "cdf": br._cdf(report),
    }


def http_publish_record(acks=1500.0, lost=0, subscribers=10_000):
    """An http-publish record: acks far ahead of a late fan-out."""
    rec = fanout_record()
    report = {
        "scenario": "http-publish", "workers": 1,
        "params": {"rate": 0, "http_connections": 8, "window_ms": 10_000, "addr": ["127.0.0.1:1"]},
        "subscribers": subscribers, "messages": 2000, "posts_acked": 2000, "acked_publishes_per_second": acks,
        "publish_window_seconds": 2000 / acks, "deliveries_expected": 2000 * subscribers,
        "deliveries_received": 2000 * subscribers - lost, "lost": lost, "lost_after_ack": lost,
        "late": 15_000_000, "window_ms": 10_000, "duplicated": 0, "out_of_order": 0, "unanswered": 0,
        "refused": {}, "to_unconnected": 0,
        "ack_latency_ms": {"samples": 2000, "p50": 3.0, "p95": 6.0, "p99": 9.0, "max": 20.0},
        "latency_ms": {"samples": 2000 * subscribers, "p50": 20_000.0, "p99": 39_000.0, "max": 40_000.0},
        "time_to_last_delivery_ms_worst_post": 40_000.0,
    }
    rec.update(benchmark="http-publish", command="scripts/bench http-publish", report=report, series=[],
               cdf=br._cdf(report))
    return rec


class Repo:
    """A copy of the generated files (and no records) in a temp dir."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="bench-report-test-")
        for d in br.DOCS:
            os.makedirs(os.path.join(self.root, os.path.dirname(d)), exist_ok=True)
            shutil.copy(os.path.join(br.ROOT, d), os.path.join(self.root, d))
        os.makedirs(os.path.join(self.root, br.RECORDS))
        os.makedirs(os.path.join(self.root, br.PLOTS))

    def add(self, rec):
        with open(os.path.join(self.root, br.RECORDS, rec["benchmark"] + ".json"), "w") as f:
            json.dump(rec, f)

    def render(self):
        br.render(types.SimpleNamespace(root=self.root))

    def read(self, path):
        with open(os.path.join(self.root, path)) as f:
            return f.read()

    def write(self, path, text):
        with open(os.path.join(self.root, path), "w") as f:
            f.write(text)


class CheckTest(unittest.TestCase):
    def setUp(self):
        self.repo = Repo()
        self.addCleanup(shutil.rmtree, self.repo.root)

    def test_the_committed_docs_match_the_committed_records(self):
        self.assertEqual(br.differences(br.ROOT), [])

    def test_rendered_docs_pass_the_check(self):
        self.repo.add(fanout_record())
        self.repo.render()
        self.assertEqual(br.differences(self.repo.root), [])

    def test_a_number_edited_in_a_generated_block_fails_naming_file_and_line(self):
        self.repo.add(fanout_record())
        self.repo.render()
        text = self.repo.read("docs/benchmarks.md")
        self.assertIn("200,000 deliveries per edge CPU-second", text)
        self.repo.write("docs/benchmarks.md", text.replace("200,000 deliveries", "250,000 deliveries", 1))
        diffs = br.differences(self.repo.root)
        self.assertEqual(len(diffs), 1)
        line = text[:text.index("200,000 deliveries")].count("\n") + 1
        self.assertTrue(diffs[0].startswith(f"docs/benchmarks.md:{line}: has "), diffs[0])
        self.assertIn("250,000", diffs[0])

    def test_a_record_changed_without_rendering_fails(self):
        self.repo.add(fanout_record())
        self.repo.render()
        self.repo.add(fanout_record(per_cpu=100_000.0))
        diffs = br.differences(self.repo.root)
        self.assertTrue(diffs and diffs[0].startswith("docs/"), diffs)

    def test_the_chart_sizing_comment_is_checked_too(self):
        self.repo.add(fanout_record())
        self.repo.render()
        values = self.repo.read("helm/switchboard/values.yaml")
        self.assertIn("200,000 frames per edge CPU-second", values)
        self.repo.write("helm/switchboard/values.yaml", values.replace("200,000 frames", "2 frames"))
        self.assertTrue(br.differences(self.repo.root)[0].startswith("helm/switchboard/values.yaml:"))

    def test_a_stale_or_missing_plot_fails(self):
        self.repo.add(fanout_record())
        self.repo.render()
        self.repo.write(f"{br.PLOTS}/gone-latency-cdf.svg", "<svg/>")
        self.assertIn("stale plot", br.differences(self.repo.root)[0])
        os.remove(os.path.join(self.repo.root, br.PLOTS, "gone-latency-cdf.svg"))
        os.remove(os.path.join(self.repo.root, br.PLOTS, "fanout-latency-cdf.svg"))
        self.assertIn("fanout-latency-cdf.svg: missing", br.differences(self.repo.root)[0])


class DeflateTest(unittest.TestCase):
    def setUp(self):
        self.repo = Repo()
        self.addCleanup(shutil.rmtree, self.repo.root)

    def variant(self, name, wire, per_cpu):
        rec = fanout_record(per_cpu=per_cpu)
        rec["benchmark"] = name
        rec["report"]["wire_bytes_per_delivery"] = wire
        rec["report"]["params"].update(payload="json-chat", payload_bytes=600, deflate=name.endswith("-on"))
        return rec

    def test_both_variants_are_tabulated_and_compared(self):
        self.repo.add(self.variant("deflate-off", 700.0, 200_000.0))
        self.repo.render()
        text = self.repo.read("docs/benchmarks.md")
        self.assertIn("| plain | json-chat, 600 B | 700 | 200,000 | 5.00 µs |", text)
        self.assertIn("| permessage-deflate | not run yet (`scripts/bench deflate`)", text)
        self.assertNotIn("of the plain wire bytes", text)
        self.repo.add(self.variant("deflate-on", 350.0, 160_000.0))
        self.repo.render()
        text = self.repo.read("docs/benchmarks.md")
        self.assertIn("read 50% of the plain wire bytes per delivery, and the edge spent 125% of the plain CPU", text)
        self.assertIn("#### `deflate-on`", text)
        self.assertEqual(br.differences(self.repo.root), [])


class VerdictTest(unittest.TestCase):
    def row(self, rec):
        return br.judged({"fanout": rec}, "fanout", br.fanout_row)

    def test_a_clean_full_record_passes_or_misses(self):
        self.assertEqual(self.row(fanout_record())[1], "**pass**")
        self.assertEqual(self.row(fanout_record(per_cpu=100_000.0))[1], "**miss**")

    def test_a_dirty_tree_is_never_of_record(self):
        for per_cpu in (100_000.0, 200_000.0):
            measured, verdict = self.row(fanout_record(clean=False, per_cpu=per_cpu))
            self.assertEqual(verdict, "not of record (made on an uncommitted tree)")
            self.assertIn("deliveries per edge CPU-second", measured)

    def test_small_scale_is_never_of_record(self):
        self.assertEqual(self.row(fanout_record(scale="small"))[1], "not of record (small scale)")

    def test_missing_records_and_benchmarks_say_so(self):
        self.assertEqual(br.judged({}, "fanout", br.fanout_row)[0], "not run yet (`scripts/bench fanout`)")
        self.assertIn("not measured yet", br.judged({}, None, None)[0])

    def test_the_curve_sets_each_rate_beside_the_loopback_floor(self):
        floor = fanout_record()
        floor["benchmark"] = "floor"
        floor["report"] = {"scenario": "floor", "params": {"sockets": 9000, "rate": 10, "payload_bytes": 200},
                           "us_per_write": 4.0, "writes_per_cpu_second": 250_000.0}
        r30 = fanout_record(per_cpu=125_000.0)
        r30["benchmark"] = "fanout-curve-r30"
        r30["report"]["params"]["rate"] = 30
        lines = br.block_fanout_curve({"records": {"floor": floor, "fanout-curve-r30": r30}})
        self.assertIn("4.00 µs", lines[0])
        row = next(x for x in lines if x.startswith("| 30 |"))
        # 125,000 per CPU-second is 8 µs per delivery, twice the 4 µs floor.
        self.assertIn("| 8.00 µs | 50% |", row)
        self.assertTrue(next(x for x in lines if x.startswith("| 60 |")).count("not run yet"))


class HttpPublishTest(unittest.TestCase):
    def row(self, rec):
        return br.judged({"http-publish": rec}, "http-publish", br.http_publish_row)

    def test_acks_pass_while_nothing_acked_is_lost_and_late_ones_are_told(self):
        measured, verdict = self.row(http_publish_record())
        self.assertEqual(verdict, "**pass**")
        self.assertIn("1,500 acked publishes/s", measured)
        self.assertIn("back to back", measured)
        self.assertIn("15,000,000 late (after 10,000 ms)", measured)
        self.assertEqual(self.row(http_publish_record(acks=900.0))[1], "**miss**")
        self.assertEqual(self.row(http_publish_record(lost=1))[1], "**miss**")
        self.assertEqual(self.row(http_publish_record(subscribers=300))[1], "**miss** (ran 300 subscribers)")

    def test_its_block_renders_from_the_record(self):
        repo = Repo()
        self.addCleanup(shutil.rmtree, repo.root)
        repo.add(http_publish_record())
        repo.render()
        text = repo.read("docs/benchmarks.md")
        block = text[text.index("<!-- bench:http-publish:begin -->"):text.index("<!-- bench:http-publish:end -->")]
        self.assertIn("| acked publishes/s | 1,500 (2,000 acked in 1.3 s) |", block)
        self.assertIn("| ack latency | p50 3 ms, p95 6 ms, p99 9 ms, max 20 ms |", block)
        self.assertEqual(br.differences(repo.root), [])


def fleet_curve_record(sockets=19_000, edges=4, cpu=2.0, idle_cpu=0.5, posts=5):
    """A fleet-curve record: a channel run over `edges` edges with an idle window."""
    rec = fanout_record()
    name = f"fleet-curve-{sockets}x{edges}"
    report = dict(rec["report"], subscribers=sockets, messages=posts, posts_acked=posts,
                  deliveries_received=posts * sockets, deliveries_expected=posts * sockets,
                  deliveries_per_edge_cpu_second=posts * sockets / cpu,
                  params={"rate": 1, "addr": [f"127.0.0.1:{i}" for i in range(edges)], "publish_after_secs": 5},
                  server={"edge_cpu_seconds": cpu, "cpu_window_seconds": 5.0, "edge_cpu_idle_seconds": idle_cpu,
                          "idle_window_seconds": 5.0},
                  posts={"count": posts, "each": [], "time_to_last_delivery_ms": {"p50": 120.0, "max": 300.0}})
    rec.update(benchmark=name, command="scripts/bench fleet-curve", report=report)
    return rec


class FleetCurveTest(unittest.TestCase):
    def test_each_point_nets_out_the_idle_edges_and_projects_dedicated_cores(self):
        # 95,000 deliveries for 2.0 edge CPU-seconds over a 5 s window; idle,
        # the edges took 0.5 CPU-seconds in 5 s (0.1 cores): 1.5 are the
        # posts', 0.3 per post, 75 ms per post on each of 4 dedicated cores.
        lines = br.block_fleet_curve({"records": {"fleet-curve-19000x4": fleet_curve_record()}})
        row = next(x for x in lines if x.startswith("| 19,000 | 4 |"))
        self.assertEqual(row.split(" | ")[2:12], ["95,000", "2.00 (5.0 s)", "0.100", "47,500", "—", "63,333",
                                                  "120 ms / 300 ms", "0.300", "75 ms",
                                                  "0 lost; 0 duplicated; 0 out of order"])
        self.assertIn("not run yet", lines[0])
        self.assertIn("not run yet (`scripts/bench fleet-curve`)",
                      next(x for x in lines if x.startswith("| 19,000 | 1 |")))
        self.assertIn("not run yet (`scripts/bench fleet`)", lines[-1])

    def test_the_fleet_record_is_its_last_row_with_idle_not_apart(self):
        fleet = fleet_curve_record(sockets=1_000_000, edges=55, cpu=20.0, posts=3)
        fleet["benchmark"] = "fleet"
        del fleet["report"]["server"]["edge_cpu_idle_seconds"]
        row = br.block_fleet_curve({"records": {"fleet": fleet}})[-1]
        self.assertTrue(row.startswith("| 1,000,000 | 55 | 3,000,000 | 20.00 (5.0 s) | — | 150,000 | — | — |"), row)
        self.assertIn("| 6.667 (idle not apart) | 121 ms |", row)

    def test_each_point_is_set_beside_the_floor_at_the_fleets_pacing(self):
        floor = fanout_record()
        floor["benchmark"] = "fleet-curve-floor"
        floor["report"] = {"scenario": "floor", "params": {"sockets": 9000, "rate": 1, "payload_bytes": 135},
                           "us_per_write": 10.0, "writes_per_cpu_second": 100_000.0}
        fleet = fleet_curve_record(sockets=1_000_000, edges=55, cpu=40.0, posts=3)
        fleet["benchmark"] = "fleet"
        recs = {"fleet-curve-floor": floor, "fleet-curve-19000x4": fleet_curve_record(), "fleet": fleet}
        lines = br.block_fleet_curve({"records": recs})
        self.assertIn("10.00 µs", lines[0])
        self.assertIn("at 1 round/s", lines[0])
        # 47,500 per edge CPU-second is 21 µs per delivery: 48% of the floor's pace.
        row = next(x for x in lines if x.startswith("| 19,000 | 4 |"))
        self.assertIn("| 47,500 | 48% |", row)
        measured, verdict = br.judged(recs, "fleet", br.fleet_cpu_row)
        self.assertIn("75% of the loopback floor at the fleet's pacing, 100,000 writes per CPU-second", measured)
        self.assertEqual(verdict, "**miss**")

    def test_its_block_and_runs_render_and_pass_the_check(self):
        repo = Repo()
        self.addCleanup(shutil.rmtree, repo.root)
        repo.add(fleet_curve_record())
        repo.render()
        text = repo.read("docs/benchmarks.md")
        block = text[text.index("<!-- bench:fleet-curve:begin -->"):text.index("<!-- bench:fleet-curve:end -->")]
        self.assertIn("[fleet-curve-19000x4](bench/fleet-curve-19000x4.json) |", block)
        self.assertIn("#### `fleet-curve-19000x4`", text)
        self.assertEqual(br.differences(repo.root), [])


def subscribe_record(name="subscribe", us=(300.0, 120.0), p50=(200.0, 90.0)):
    """A subscribe record: two rounds, cold then warm."""
    rec = fanout_record()
    members = name == "subscribe"
    rounds = [{"round": i + 1, "cache": "cold" if i == 0 else "warm", "users_connected": 10_000,
               "subscribes_ok": 500_000, "refused": {}, "failed": 0, "skipped": 0, "window_seconds": 20.0,
               "subscribes_per_second": 25_000.0,
               "latency_ms": {"samples": 500_000, "p50": p50[i], "p90": 2 * p50[i], "p95": 3 * p50[i],
                              "p99": 4 * p50[i], "p999": 5 * p50[i], "max": 6 * p50[i]},
               "edge_cpu_seconds": us[i] / 2, "edge_cpu_seconds_per_1000_subscribes": us[i] / 1000,
               "edge_cpu_us_per_subscribe": us[i], "redis_cpu_seconds_per_1000_subscribes": 0.05,
               "chat_auth": ({"store_allow": 500_000} if i == 0 else {"cache_allow": 500_000}) if members
               else {"mode_allow": 500_000}} for i in range(2)]
    report = {"scenario": "subscribe", "workers": 1, "params": {"users": 10_000, "rounds": 2},
              "users": 10_000, "chats_per_user": 50, "group_size": 100, "chats": 5_000,
              "subscribes_per_round": 500_000, "edge_chat_auth": "members" if members else "open",
              "import": {"chats": 5_000, "memberships": 500_000, "memberships_added": 500_000, "seconds": 10.0,
                         "chats_per_second": 500.0} if members else None,
              "connections": {"attempted": 20_000, "established": 20_000, "failed": 0, "refused_with_503": 0},
              "server": {"edge_cpu_seconds": us[0] / 2}, "rounds": rounds}
    rec.update(benchmark=name, command="scripts/bench subscribe", report=report, series=[], cdf=br._cdf(report))
    return rec


class SubscribeTest(unittest.TestCase):
    def test_each_round_of_both_modes_is_a_row_and_the_check_is_their_difference(self):
        lines = br.block_subscribe({"records": {"subscribe": subscribe_record()}})
        rows = [x for x in lines if x.startswith("| members |")]
        self.assertEqual(len(rows), 2)
        self.assertEqual(rows[0].split(" | ")[1:10],
                         ["1 (cold)", "500,000 of 500,000", "0 / 0 / 0", "25,000", "200 ms / 600 ms / 800 ms / 1,200 ms",
                          "0.300", "300.00 µs", "0.050", "store allow 500,000"])
        self.assertIn("| 2 (warm) |", rows[1])
        self.assertIn("cache allow 500,000", rows[1])
        self.assertIn("| open (baseline) | not run yet (`scripts/bench subscribe`)", "\n".join(lines))
        self.assertIn("500,000 memberships imported through the membership API", "\n".join(lines))
        self.assertNotIn("the membership check cost", "\n".join(lines))
        both = br.block_subscribe({"records": {"subscribe": subscribe_record(),
                                               "subscribe-open": subscribe_record("subscribe-open", (100.0, 90.0),
                                                                                  (50.0, 40.0))}})
        self.assertIn("the membership check cost 200.00 µs of edge CPU per subscribe with the cache cold "
                      "(p50 200 ms against 50 ms) and 30.00 µs of edge CPU per subscribe with the cache warm "
                      "(p50 90 ms against 40 ms).", both[-1])
        self.assertIn("mode allow 500,000", next(x for x in both if x.startswith("| open (baseline) | 1 (cold)")))

    def test_each_round_is_a_curve_of_the_latency_plot(self):
        rec = subscribe_record()
        self.assertEqual(sorted(rec["cdf"]), ["round 1 (cold)", "round 2 (warm)"])
        self.assertIn(f"{br.PLOTS}/subscribe-latency-cdf.svg", br.plots_of("subscribe", rec))

    def test_its_block_and_runs_render_and_pass_the_check(self):
        repo = Repo()
        self.addCleanup(shutil.rmtree, repo.root)
        repo.add(subscribe_record())
        repo.add(subscribe_record("subscribe-open", (100.0, 90.0)))
        repo.render()
        text = repo.read("docs/benchmarks.md")
        block = text[text.index("<!-- bench:subscribe:begin -->"):text.index("<!-- bench:subscribe:end -->")]
        self.assertIn("[subscribe-open](bench/subscribe-open.json) |", block)
        self.assertIn("#### `subscribe`", text)
        self.assertIn("#### `subscribe-open`", text)
        self.assertEqual(br.differences(repo.root), [])


def grpc_publish_record(name="grpc-publish", rate=10_000.0, per_cpu=20_000.0, batch=1, refused=None):
    """A grpc-publish record: the sequence scenario through one router's API."""
    rec = fanout_record()
    via = "http" if name == "grpc-publish-http" else "grpc"
    report = {"scenario": "sequence", "workers": 1, "params": {"via": via, "batch": batch, "publishers": 256},
              "routers": 1, "via": via, "batch": batch, "publishers": 256, "published": 100_000,
              "calls": 100_000 // batch, "acked": 100_000, "refused_by_status": refused or {}, "duplicated": 0,
              "unanswered": 0, "connect_errors": 0, "publish_window_seconds": 10.0,
              "acked_publishes_per_second": rate, "publishes_per_router_cpu_second": per_cpu,
              "publishes_per_router_and_redis_cpu_second": per_cpu / 3,
              "publish_latency_ms": {"samples": 100_000, "p50": 20.0, "p99": 40.0, "max": 50.0},
              "server": {"router_cpu_seconds": 100_000 / per_cpu}}
    rec.update(benchmark=name, command="scripts/bench grpc-publish", report=report)
    return rec


class GrpcPublishTest(unittest.TestCase):
    def test_each_transport_is_a_row_and_the_grpc_ones_are_divided_by_http(self):
        lines = br.block_grpc_publish({"records": {"grpc-publish": grpc_publish_record(rate=12_000.0,
                                                                                       per_cpu=25_000.0)}})
        rows = [x for x in lines if x.startswith("| ")][1:]
        self.assertEqual(len(rows), 3)
        self.assertIn("| HTTP/1.1, `POST /api/publish` | not run yet (`scripts/bench grpc-publish`)", rows[0])
        self.assertEqual(rows[1].split(" | ")[1:8], ["1", "256", "12,000", "25,000", "8,333", "20 ms / 40 ms",
                                                     "0 / 0 / 0"])
        self.assertIn("| gRPC, `PublishBatch` | not run yet", rows[2])
        self.assertNotIn("Against HTTP", "\n".join(lines))
        recs = {"grpc-publish-http": grpc_publish_record("grpc-publish-http"),
                "grpc-publish": grpc_publish_record(rate=12_000.0, per_cpu=25_000.0),
                "grpc-publish-batch": grpc_publish_record("grpc-publish-batch", 30_000.0, 60_000.0, batch=16,
                                                          refused={"503": 2, "code_503": 1})}
        lines = br.block_grpc_publish({"records": recs})
        batch = next(x for x in lines if x.startswith("| gRPC, `PublishBatch` |"))
        self.assertEqual(batch.split(" | ")[1:3], ["16", "16"])
        self.assertIn("| 2 503, 1 code_503 / 0 / 0 |", batch)
        self.assertEqual(lines[-1], "Against HTTP: unary gRPC 1.20× the acked publishes/s and 1.25× the publishes "
                                    "per router CPU-second; `PublishBatch` (16 publishes a call) 3.00× the acked "
                                    "publishes/s and 3.00× the publishes per router CPU-second.")

    def test_a_failed_variant_says_so_and_is_not_compared(self):
        failed = dict(grpc_publish_record(), error="died during the run: router-0", report=None)
        lines = br.block_grpc_publish({"records": {"grpc-publish-http": grpc_publish_record("grpc-publish-http"),
                                                   "grpc-publish": failed}})
        self.assertIn("| gRPC, unary `Publish` | **failed**: died during the run: router-0 |", "\n".join(lines))
        self.assertNotIn("Against HTTP", "\n".join(lines))

    def test_its_block_and_runs_render_and_pass_the_check(self):
        repo = Repo()
        self.addCleanup(shutil.rmtree, repo.root)
        for name in ("grpc-publish", "grpc-publish-http", "grpc-publish-batch"):
            repo.add(grpc_publish_record(name, batch=16 if name.endswith("batch") else 1))
        repo.render()
        text = repo.read("docs/benchmarks.md")
        block = text[text.index("<!-- bench:grpc-publish:begin -->"):text.index("<!-- bench:grpc-publish:end -->")]
        self.assertIn("[grpc-publish-batch](bench/grpc-publish-batch.json) |", block)
        self.assertIn("Against HTTP: unary gRPC 1.00×", block)
        for name in ("grpc-publish", "grpc-publish-http", "grpc-publish-batch"):
            self.assertIn(f"#### `{name}`", text)
        self.assertEqual(br.differences(repo.root), [])


def fuzz_record(target="frames", cpu=3650.0, dirty=False, result="ok", crash=None):
    """A campaign record as scripts/fuzz writes it."""
    return {
        "target": target, "crate_dir": "edge/fuzz", "command": f"scripts/fuzz --minutes 60 --jobs 2 {target}",
        "commit": "1" * 40, "dirty": dirty, "toolchain": "rustc test", "machine": {"cpus": 2, "kernel": "test"},
        "started": "2026-12-05T18:00:00Z", "wall_seconds": 1900, "cpu_seconds": cpu, "cpu_budget_seconds": 3600,
        "rounds": 2, "jobs": 2, "executions": 50_000_000, "corpus_before": 100, "corpus_after": 120,
        "result": result, "crash_input": crash,
    }


class FuzzTest(unittest.TestCase):
    def row(self, target, **kw):
        lines = br.block_fuzz({"fuzz": {target: fuzz_record(target, **kw)}})
        return next(l for l in lines if l.startswith(f"| `{target}` |"))

    def test_an_hour_on_a_clean_tree_without_a_crash_is_of_record(self):
        row = self.row("frames")
        self.assertIn("| 3,650 (3,600) | 50,000,000 | 100 → 120 | **no crash** in at least one CPU-hour |", row)
        self.assertIn("[frames](fuzz/frames.json)", row)

    def test_short_dirty_and_crashed_campaigns_say_so(self):
        self.assertIn("under the CPU-hour (1,800 CPU-s)", self.row("ids", cpu=1800.0))
        self.assertIn("not of record (made on an uncommitted tree)", self.row("ids", dirty=True))
        row = self.row("ids", result="failed", crash="artifacts/ids/crash-1")
        self.assertIn("**crash**: `artifacts/ids/crash-1`", row)
        self.assertNotIn("no crash", row)

    def test_every_target_has_a_row_and_one_without_a_record_says_how_to_run_it(self):
        lines = br.block_fuzz({"fuzz": {}})
        self.assertEqual(len(lines), 2 + len(br.FUZZ_TARGETS))
        self.assertIn("not run yet (`scripts/fuzz --minutes 60 --jobs 2 decode_server`)", "\n".join(lines))

    def test_the_block_renders_from_the_records_and_a_changed_record_fails_the_check(self):
        repo = Repo()
        self.addCleanup(shutil.rmtree, repo.root)
        os.makedirs(os.path.join(repo.root, br.FUZZ))
        path = os.path.join(repo.root, br.FUZZ, "frames.json")
        with open(path, "w") as f:
            json.dump(fuzz_record(), f)
        repo.render()
        self.assertIn("**no crash** in at least one CPU-hour", repo.read("docs/benchmarks.md"))
        self.assertEqual(br.differences(repo.root), [])
        with open(path, "w") as f:
            json.dump(fuzz_record(cpu=100.0), f)
        self.assertTrue(br.differences(repo.root)[0].startswith("docs/benchmarks.md:"))
        with open(os.path.join(repo.root, br.FUZZ, "ids.json"), "w") as f:
            json.dump(fuzz_record("frames"), f)
        with self.assertRaises(SystemExit):
            br.differences(repo.root)


class SmallBaseTest(unittest.TestCase):
    """The small run's ports: free, and outside the ephemeral range when
    any base allows it (a port inside it can be taken between the check
    and the bind)."""

    def test_a_default_range_keeps_the_first_free_base(self):
        self.assertEqual(br.small_base((32768, 60999), free=lambda p: True), 28000)

    def test_a_widened_range_moves_every_port_below_it(self):
        base = br.small_base((10000, 65000), free=lambda p: True)
        self.assertEqual(base, 4900)
        self.assertTrue(all(1024 <= p < 10000 for p in br.small_ports(base)))

    def test_a_taken_port_skips_its_base_and_outside_bases_still_come_first(self):
        taken = set(br.small_ports(4900))
        base = br.small_base((10000, 65000), free=lambda p: p not in taken)
        self.assertEqual(base, 6000)
        self.assertFalse(any(10000 <= p <= 65000 for p in br.small_ports(base)))

    def test_with_no_base_outside_the_range_the_first_free_one_is_taken(self):
        self.assertEqual(br.small_base((1024, 65535), free=lambda p: p > 30000), 34600)
        self.assertIsNone(br.small_base((1024, 65535), free=lambda p: False))

    def test_the_ports_are_those_scripts_cluster_uses(self):
        ports = br.small_ports(18000)
        # NATS clients and routes, Redis data and bus, sentinels, router gRPC, standalone edge, routers, edges.
        for p in (14222, 14232, 14242, 16379, 16384, 16389, 16399, 16404, 18050, 18060, 18070, 18080, 18089):
            self.assertIn(p, ports)
        self.assertEqual(len(ports), len(set(ports)))


class RecordTest(unittest.TestCase):
    def test_records_stay_compact(self):
        rec = fanout_record()
        self.assertLessEqual(len(rec["series"]), br.SERIES_POINTS)
        self.assertEqual(len(rec["report"]["posts"]["each"]), br.POSTS_KEPT)
        self.assertNotIn("series", rec["report"])
        self.assertEqual([p[1] for p in rec["cdf"]["all"]], [0.5, 0.9, 0.95, 0.99, 0.999, 1.0])
        self.assertLess(len(json.dumps(rec)), 16_000)


if __name__ == "__main__":
    unittest.main()
