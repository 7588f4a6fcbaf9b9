#!/usr/bin/env python3
"""Cluster DNS for the local Kubernetes cluster (what CoreDNS is in kind).

Runs dnsmasq as a child on LISTEN:53 (the bridge gateway, reached by pods through the
kube-dns Service) answering only from a hosts file, and refreshes that file from the API server
once a second:

  <svc>.<ns>.svc.<domain>              the Service's cluster IP, or for a headless Service
                                       the addresses of its Endpoints
  <hostname>.<svc>.<ns>.svc.<domain>   an Endpoints address with a hostname (a pod whose
                                       spec.hostname/subdomain name a headless Service)

Names in <domain> that are not in the file get NXDOMAIN; nothing is forwarded anywhere, so all
traffic stays on this machine. Exits (taking dnsmasq with it) on SIGTERM.

usage: dns.py SERVER TOKEN_FILE CA_FILE LISTEN DOMAIN STATE_DIR
       dns.py resolve DNS_SERVER NAME   (one A query over UDP; prints the addresses, exits 1 if none)
"""
import json
import os
import random
import socket
import struct
import signal
import ssl
import subprocess
import sys
import time
import urllib.request


def resolve(server: str, name: str) -> list:
    """One A query, no retries: for up.sh's check that DNS answers through the kube-dns Service."""
    qid = random.randrange(1 << 16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q, (server, 53))
        r, _ = s.recvfrom(4096)
    rid, _flags, qd, an = struct.unpack(">HHHH", r[:8])
    if rid != qid:
        return []
    i = 12
    for _ in range(qd):  # skip the question: labels, then type and class
        while r[i]:
            i += 1 + r[i]
        i += 5
    out = []
    for _ in range(an):
        if r[i] & 0xC0 == 0xC0:  # compressed name
            i += 2
        else:
            while r[i]:
                i += 1 + r[i]
            i += 1
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", r[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(r[i:i + 4]))
        i += rdlen
    return out


def main() -> int:
    if sys.argv[1:2] == ["resolve"]:
        addrs = resolve(sys.argv[2], sys.argv[3])
        print(" ".join(addrs))
        return 0 if addrs else 1
    server, token_file, ca_file, listen, domain, state = sys.argv[1:7]
    os.makedirs(state, exist_ok=True)
    hosts = os.path.join(state, "hosts")
    if not os.path.exists(hosts):
        open(hosts, "w").close()
    token = open(token_file).read().split(",")[0].strip()
    ctx = ssl.create_default_context(cafile=ca_file)

    dnsmasq_cmd = [
        "dnsmasq", "--keep-in-foreground", "--log-facility=-", "--user=root",
        "--no-resolv", "--no-hosts", "--no-poll", f"--addn-hosts={hosts}",
        f"--listen-address={listen}", "--bind-interfaces", "--port=53",
        f"--local=/{domain}/", "--local-ttl=1", "--no-negcache", "--cache-size=0",
        "--pid-file=",
    ]
    dnsmasq = None

    def stop(*_):
        if dnsmasq is None:
            sys.exit(0)
        dnsmasq.terminate()
        try:
            dnsmasq.wait(5)
        except subprocess.TimeoutExpired:
            dnsmasq.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def get(path):
        req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return json.load(r)

    written = None
    while True:
        if dnsmasq is not None and dnsmasq.poll() is not None:
            print(f"dnsmasq exited with {dnsmasq.returncode}", file=sys.stderr, flush=True)
            return 1
        try:
            services = get("/api/v1/services")["items"]
            endpoints = get("/api/v1/endpoints")["items"]
        except Exception as e:  # the API server restarting: keep the last answers
            print(f"api: {e}", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        records = set()
        headless = set()
        for s in services:
            ns, name = s["metadata"]["namespace"], s["metadata"]["name"]
            ip = s["spec"].get("clusterIP")
            if ip and ip != "None":
                records.add((ip, f"{name}.{ns}.svc.{domain}"))
            else:
                headless.add((ns, name))
        for e in endpoints:
            ns, name = e["metadata"]["namespace"], e["metadata"]["name"]
            if (ns, name) not in headless:
                continue
            for subset in e.get("subsets") or []:
                for a in subset.get("addresses") or []:
                    records.add((a["ip"], f"{name}.{ns}.svc.{domain}"))
                    if a.get("hostname"):
                        records.add((a["ip"], f"{a['hostname']}.{name}.{ns}.svc.{domain}"))
        text = "".join(f"{ip} {host}\n" for ip, host in sorted(records))
        if text != written:
            tmp = hosts + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, hosts)
            if dnsmasq is None:  # started once the file has answers, so no SIGHUP races its start
                dnsmasq = subprocess.Popen(dnsmasq_cmd)
            else:
                dnsmasq.send_signal(signal.SIGHUP)  # re-reads the hosts file
            written = text
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
