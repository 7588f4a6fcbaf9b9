"""A small `helm` stand-in over helm-python-sdk (Helm's Go SDK as a library); no helm binary
exists in the registries these machines reach.

  kord-helm template NAME CHART [-n NS] [--values-json JSON]
  kord-helm lint CHART [--values-json JSON] [--strict]
  kord-helm install|upgrade NAME CHART [-n NS] [--values-json JSON] [--create-namespace]
                                       [--wait] [--timeout SECONDS] [--kubeconfig PATH]
  kord-helm uninstall NAME [-n NS] [--wait] [--timeout SECONDS] [--kubeconfig PATH]
"""

import argparse
import json
import os
import sys

import helm_python


def main():
    parser = argparse.ArgumentParser(prog="kord-helm", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["template", "lint", "install", "upgrade", "uninstall"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--values-json", default="{}")
    parser.add_argument("--create-namespace", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    opts = parser.parse_args()
    values = json.loads(opts.values_json)
    try:
        if opts.command == "lint":
            result = helm_python.lint(opts.args[0], values, strict=opts.strict)
            print(json.dumps(result, indent=2, default=str))
            # Helm's support.Severity: 1 info, 2 warning, 4 error; "errors" lists failures.
            messages = result.get("messages", []) if isinstance(result, dict) else []
            failing = {2, 4} if opts.strict else {4}
            bad = [m for m in messages if m.get("severity") in failing]
            return 1 if bad or (isinstance(result, dict) and result.get("errors")) else 0
        if opts.command == "template":
            name, chart = opts.args[0], opts.args[1]
            rendered = helm_python.Chart.load(chart).render(values, name=name, namespace=opts.namespace)
            if isinstance(rendered, dict):
                for path in sorted(rendered):
                    print(f"---\n# Source: {path}\n{rendered[path]}")
            else:
                print(rendered)
            return 0
        config = helm_python.Config(kubeconfig_path=opts.kubeconfig, namespace=opts.namespace)
        wait = "watcher" if opts.wait else None
        if opts.command in ("install", "upgrade"):
            name, chart = opts.args[0], opts.args[1]
            if opts.command == "install":
                release = config.install(chart, name, values, namespace=opts.namespace,
                                         create_namespace=opts.create_namespace,
                                         wait=wait, timeout=opts.timeout)
            else:
                release = config.upgrade(chart, name, values, namespace=opts.namespace,
                                         wait=wait, timeout=opts.timeout)
            info = release.get("info", {}) if isinstance(release, dict) else {}
            print(json.dumps({"name": name, "status": info.get("status"),
                              "version": release.get("version") if isinstance(release, dict) else None}))
            return 0
        config.uninstall(opts.args[0], wait=wait, timeout=opts.timeout, ignore_not_found=True)
        print(json.dumps({"name": opts.args[0], "status": "uninstalled"}))
        return 0
    except helm_python.HelmError as err:
        print(f"kord-helm {opts.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
