#!/usr/bin/env python3
"""knoq-gateway against nginx doing the same job, and against the upstream
directly, in one run on one machine.

Targets, on the same simulated Knoq (HTTPS, checks Cookie and Origin on
every request, so a proxy that rewrites wrongly shows up as errors):
  direct   the load generator straight to the upstream (the test bed's limit)
  nginx    requires the bearer token, replaces Cookie and Origin, drops
           Authorization, proxies over HTTPS with keep-alive reuse
  floor    examples/floor_proxy.rs: the gateway's crates and settings doing
           only the token check and header swap (no quotas, log, metrics),
           i.e. what the stack costs before the gateway's own work
  gateway  knoq-gateway with 50 users, 200 tokens, quotas and metrics on

The proxy under test and the upstream share CPU 0; the load generator runs on
CPU 1 (taskset). Each target runs several times, interleaved; medians are
reported. Installs wrk, nginx (Debian) and oha (crates.io) when missing.

Usage: scripts/bench [--rounds N] [--seconds S] [--rate R] [--baseline OTHER_BINARY]
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import ssl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "knoq-gateway")
FLOOR = os.path.join(ROOT, "target", "release", "examples", "floor_proxy")
COOKIE = "knoq_session=demo-cookie-0001"
ORIGIN = "https://knoq.one"
TICK = os.sysconf("SC_CLK_TCK")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools():
    missing = [t for t in ("wrk", "nginx", "redis-server")
               if not shutil.which(t) and not os.path.exists("/usr/sbin/" + t)]
    if missing:
        pkgs = [{"wrk": "wrk", "nginx": "nginx-light", "redis-server": "redis-server"}[t] for t in missing]
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        sh(sudo + ["apt-get", "update", "-qq"])
        sh(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + pkgs,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("oha"):
        sh(["cargo", "install", "oha", "--locked"])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def rss_kib(pids, key="VmRSS"):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(p) for p in out]


def upstream_conns(port, pids):
    """Established connections to the upstream owned by the given processes."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    own = {f"pid={p}," for p in pids}
    return len([l for l in out.splitlines() if any(o in l for o in own)])


class Bed:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, cmd, cpu, **kw):
        p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=subprocess.DEVNULL,
                             stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(5)
            except Exception:
                p.kill()


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def setup(bed, tmp):
    up = free_port()
    bed.start([BIN, "mock-knoq", "--listen", f"127.0.0.1:{up}", "--require-origin"], 0)
    wait_port(up)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ca = json.loads(urllib.request.urlopen(f"https://127.0.0.1:{up}/_sim/ca", context=ctx).read())["caPem"]
    with open(os.path.join(tmp, "ca.pem"), "w") as f:
        f.write(ca)
    text = ("Benchmark session: summarise the quarterly planning notes, list the open risks, "
            "and propose three next steps for the platform team. ") * 3
    req = urllib.request.Request(f"https://127.0.0.1:{up}/api/managed-agents/session", method="POST",
                                 data=json.dumps({"text": text[:400]}).encode(),
                                 headers={"Cookie": COOKIE, "Origin": ORIGIN, "Content-Type": "application/json"})
    sid = json.loads(urllib.request.urlopen(req, context=ctx).read())["id"]
    time.sleep(0.6)  # the simulated agent answers after 200 ms
    path = f"/api/managed-agents/transcript?sessionId={sid}"
    req = urllib.request.Request(f"https://127.0.0.1:{up}{path}", headers={"Cookie": COOKIE, "Origin": ORIGIN})
    body = urllib.request.urlopen(req, context=ctx).read()
    return up, path, len(body)


def gateway_config(tmp, up, log_level, read_quota, http2="true", name="gateway", store=""):
    users, tokens = [], []
    token0 = None
    for u in range(50):
        write_private(os.path.join(tmp, f"u{u}.cookie"), COOKIE + "\n")
        users.append(f'[[users]]\nname = "user{u}"\ncookie_file = "u{u}.cookie"\n')
    for t in range(200):
        tok = "kgw_bench_" + hashlib.sha256(str(t).encode()).hexdigest()[:40]
        token0 = token0 or tok
        tokens.append(f'[[tokens]]\nname = "tool{t}"\nuser = "user{t % 50}"\nsha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n')
    port, admin = free_port(), free_port()
    cfg = f"""[server]
listen = "127.0.0.1:{port}"
max_connections = 8192
[admin]
listen = "127.0.0.1:{admin}"
[upstream]
url = "https://127.0.0.1:{up}"
ca_file = "ca.pem"
http2 = {http2}
[state]
dir = "state-{name}"
[log]
level = "{log_level}"
[quotas]
read = [{f'"{read_quota}"' if read_quota else ""}]
{store}
""" + "".join(users) + "".join(tokens)
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(cfg)
    return path, port, token0


def nginx_config(tmp, up, token):
    port = free_port()
    os.makedirs(os.path.join(tmp, "nginx", "logs"), exist_ok=True)
    conf = f"""worker_processes 1;
pid {tmp}/nginx/nginx.pid;
error_log {tmp}/nginx/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {tmp}/nginx/logs/access.log;
  client_body_temp_path {tmp}/nginx/body;
  proxy_temp_path {tmp}/nginx/proxy;
  upstream knoq {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      if ($http_authorization != "Bearer {token}") {{ return 401; }}
      proxy_pass https://knoq;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{up};
      proxy_set_header Cookie "{COOKIE}";
      proxy_set_header Origin "{ORIGIN}";
      proxy_set_header Authorization "";
      proxy_ssl_session_reuse on;
      proxy_ssl_trusted_certificate {tmp}/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
    }}
  }}
}}
"""
    path = os.path.join(tmp, "nginx", "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path, port


def wrk(url, headers, seconds, conns=64):
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errs = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in errors.groups()) if errors else 0)
    return rps, total, errs


def oha(url, headers, seconds, rate):
    cmd = ["taskset", "-c", "1", "oha", "-z", f"{seconds}s", "-q", str(rate), "-c", "64",
           "--latency-correction", "--no-tui", "--output-format", "json", "--insecure"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True).stdout
    j = json.loads(out)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    # Requests still open when the run's time is up are cut by oha itself.
    errs = {k: v for k, v in j.get("errorDistribution", {}).items() if "deadline" not in k}
    bad = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(errs.values())
    return pct["p50"] * 1000, pct["p99"] * 1000, pct["p99.9"] * 1000, bad


def idle_connections(port, n=1000):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
    return socks


def measure(name, url, headers, pids, up_pids, up_port, a, idle_port=None):
    time.sleep(0.2)
    wrk(url, headers, 2)  # warm-up
    c0, u0 = cpu_ticks(pids), cpu_ticks(up_pids)
    rss_start = rss_kib(pids)
    result = {}
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    conns_seen = []

    start = time.time()
    import threading
    def sample():
        while time.time() - start < a.seconds - 1:
            conns_seen.append(upstream_conns(up_port, pids))
            time.sleep(1)
    t = threading.Thread(target=sample)
    t.start()
    rps, total, errs = wrk(url, headers, a.seconds)
    t.join()
    c1, u1 = cpu_ticks(pids), cpu_ticks(up_pids)
    result["rps"] = rps
    result["cpu_us"] = (c1 - c0) / TICK * 1e6 / max(total, 1)
    result["upstream_cpu_us"] = (u1 - u0) / TICK * 1e6 / max(total, 1)
    result["errors"] = errs
    result["upstream_conns"] = max(conns_seen) if conns_seen else upstream_conns(up_port, pids)
    p50, p99, p999, bad = oha(url, headers, a.seconds, a.rate)
    result.update(p50=p50, p99=p99, p999=p999)
    result["errors"] += bad
    result["rss_start_mib"] = rss_start / 1024
    result["rss_peak_mib"] = rss_kib(pids, "VmHWM") / 1024
    if idle_port:
        socks = idle_connections(idle_port)
        time.sleep(1)
        result["rss_idle_mib"] = rss_kib(pids) / 1024
        for s in socks:
            s.close()
    else:
        result["rss_idle_mib"] = float("nan")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=2000)
    # For profiling experiments: what the gateway's per-request extras cost.
    ap.add_argument("--gateway-log", default="info", help="gateway log level (default info, as shipped)")
    ap.add_argument("--read-quota", default="100000/sec", help='gateway read quota window, or "" for none')
    ap.add_argument("--only", default="", help="comma-separated targets to run")
    ap.add_argument("--upstream-http2", default="true", help="gateway's upstream.http2 (true/false)")
    ap.add_argument("--baseline", default="", help="another knoq-gateway binary (e.g. an earlier commit's) "
                    "to measure as target 'baseline' in the same run, on the same config")
    a = ap.parse_args()
    ensure_tools()
    sh(["cargo", "build", "--release", "--quiet", "--bin", "knoq-gateway", "--example", "floor_proxy"], cwd=ROOT)
    tmp = tempfile.mkdtemp(prefix="kgw-bench-")
    os.chmod(tmp, 0o700)
    bed = Bed(tmp)
    try:
        up, path, body_len = setup(bed, tmp)
        up_pid = bed.procs[0].pid
        gw_cfg, gw_port, token = gateway_config(tmp, up, a.gateway_log, a.read_quota, a.upstream_http2)
        gw = bed.start([BIN, "serve", "--config", gw_cfg], 0)
        wait_port(gw_port)
        ng_conf, ng_port = nginx_config(tmp, up, token)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        ng = bed.start([nginx, "-p", os.path.join(tmp, "nginx"), "-c", ng_conf, "-g", "daemon off;"], 0)
        wait_port(ng_port)
        ng_pids = children(ng.pid)
        fl_port = free_port()
        fl = bed.start([FLOOR, f"127.0.0.1:{fl_port}", f"https://127.0.0.1:{up}", os.path.join(tmp, "ca.pem"),
                        token, COOKIE, ORIGIN], 0)
        wait_port(fl_port)
        # The gateway on a shared store: a Redis of its own on CPU 0 with
        # it (measured together: a replica's cost includes its store calls).
        rd_port = free_port()
        rd = bed.start(["redis-server", "--port", str(rd_port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", tmp], 0)
        wait_port(rd_port)
        write_private(os.path.join(tmp, "store.key"), "ab" * 32 + "\n")
        store = (f'[store]\nkind = "redis"\nurl = "redis://127.0.0.1:{rd_port}/0"\n'
                 'secret_key_file = "store.key"\n')
        gr_cfg, gr_port, _ = gateway_config(tmp, up, a.gateway_log, a.read_quota, a.upstream_http2,
                                            "gateway-redis", store)
        gr = bed.start([BIN, "serve", "--config", gr_cfg], 0)
        wait_port(gr_port)
        baseline = None
        if a.baseline:
            bl_cfg, bl_port, _ = gateway_config(tmp, up, a.gateway_log, a.read_quota, a.upstream_http2, "baseline")
            baseline = bed.start([a.baseline, "serve", "--config", bl_cfg], 0)
            wait_port(bl_port)
        targets = {
            "direct": (f"https://127.0.0.1:{up}{path}", [f"Cookie: {COOKIE}", f"Origin: {ORIGIN}"], [up_pid], None),
            "nginx": (f"http://127.0.0.1:{ng_port}{path}", [f"Authorization: Bearer {token}"], ng_pids, ng_port),
            "floor": (f"http://127.0.0.1:{fl_port}{path}", [f"Authorization: Bearer {token}"], [fl.pid], fl_port),
            "knoq-gateway": (f"http://127.0.0.1:{gw_port}{path}", [f"Authorization: Bearer {token}"], [gw.pid], gw_port),
            "gateway-redis": (f"http://127.0.0.1:{gr_port}{path}", [f"Authorization: Bearer {token}"],
                              [gr.pid, rd.pid], gr_port),
        }
        if baseline:
            targets["baseline"] = (f"http://127.0.0.1:{bl_port}{path}", [f"Authorization: Bearer {token}"],
                                   [baseline.pid], bl_port)
        if a.only:
            targets = {k: v for k, v in targets.items() if k in a.only.split(",")}
        runs = {k: [] for k in targets}
        for r in range(a.rounds):
            for name, (url, headers, pids, idle) in targets.items():
                res = measure(name, url, headers, pids, [up_pid], up, a, idle)
                runs[name].append(res)
                print(f"round {r + 1} {name}: {json.dumps({k: round(v, 1) for k, v in res.items()})}", file=sys.stderr)
        med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
        cpu = open("/proc/cpuinfo").read()
        model = re.search(r"model name\s*:\s*(.*)", cpu)
        print(f"\nMachine: {os.cpu_count()} cores, {model.group(1) if model else 'unknown CPU'}; "
              f"response body {body_len} bytes; {a.rounds} rounds x {a.seconds} s, medians; "
              f"fixed rate {a.rate} req/s (latency-corrected)\n")
        cols = [("rps", "req/s (64 conns)", "{:.0f}"), ("cpu_us", "proxy CPU µs/req", "{:.1f}"),
                ("upstream_cpu_us", "upstream CPU µs/req", "{:.1f}"), ("p50", "p50 ms", "{:.2f}"),
                ("p99", "p99 ms", "{:.2f}"), ("p999", "p99.9 ms", "{:.2f}"), ("errors", "errors", "{:.0f}"),
                ("rss_start_mib", "RSS start MiB", "{:.1f}"), ("rss_peak_mib", "RSS peak MiB", "{:.1f}"),
                ("rss_idle_mib", "RSS 1000 idle MiB", "{:.1f}"), ("upstream_conns", "upstream conns", "{:.0f}")]
        print("| target | " + " | ".join(c[1] for c in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for name in targets:
            print(f"| {name} | " + " | ".join(c[2].format(med[name][c[0]]) for c in cols) + " |")
        def ratio(a, b, keys):
            if a in med and b in med:
                parts = [f"{label} {med[a][k] / med[b][k]:.2f}x" for k, label in keys
                         if med[b][k] and med[a][k] == med[a][k] and med[b][k] == med[b][k]]
                print(f"  {a} / {b}: " + ", ".join(parts))
        full = [("rps", "req/s"), ("cpu_us", "CPU per request"), ("p99", "p99"),
                ("rss_idle_mib", "RSS with 1000 idle")]
        print("\nRatios (medians):")
        ratio("knoq-gateway", "nginx", full)
        ratio("floor", "nginx", full)
        ratio("knoq-gateway", "floor", full)
        ratio("knoq-gateway", "baseline", full)
        ratio("gateway-redis", "knoq-gateway", full + [("p50", "p50")])
        ratio("knoq-gateway", "direct", [("rps", "req/s")])
        ratio("nginx", "direct", [("rps", "req/s")])
    finally:
        bed.stop()


if __name__ == "__main__":
    main()
