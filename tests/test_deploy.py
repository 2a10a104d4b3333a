"""
Tests for deploy/: the manifests parse and agree with the code's defaults
(port, probe paths, image, grace period, secrets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from openai_proxy.config import Config, parse_workers
from openai_proxy.ops.drain import DEFAULT_GRACE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
IMAGE = "openai-proxy:latest"
SECRETS = ("PROXY_KEY", "OPENAI_KEY", "TENCENT_CLOUD_SID", "TENCENT_CLOUD_SKEY")


def _default_port() -> int:
    # "tcp:9000" (possibly with ":interface=..." options after it).
    return int(Config().listen[0].split(":")[1])


def _kubernetes() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes, by kind."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                documents[document["kind"]] = document
    return documents


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _dockerfile() -> dict[str, str]:
    """The final stage's instructions of the Dockerfile, by keyword, joined."""
    text = (ROOT / "Dockerfile").read_text("utf-8").replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    found: dict[str, str] = {}
    for line in final.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.isupper():
            found[keyword] = f"{found.get(keyword, '')} {rest}".strip()
    return found


def _image_env() -> dict[str, str]:
    words = _dockerfile()["ENV"].split()
    return dict(word.split("=", 1) for word in words)


class DockerfileTests(TestCase):
    def test_runs_as_the_uid_the_manifests_expect(self) -> None:
        pod = _kubernetes()["Deployment"]["spec"]["template"]["spec"]
        user = _dockerfile()["USER"]
        self.assertEqual(
            user,
            f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
        )
        self.assertNotEqual(user.split(":")[0], "0")

    def test_exposes_the_default_port(self) -> None:
        self.assertEqual(_dockerfile()["EXPOSE"], str(_default_port()))

    def test_healthcheck_reads_port_itself(self) -> None:
        self.assertIn(
            '"-m", "openai_proxy.ops.healthcheck"', _dockerfile()["HEALTHCHECK"]
        )

    def test_workers_auto_by_default(self) -> None:
        self.assertEqual(_image_env()["WORKERS"], "auto")
        self.assertGreaterEqual(parse_workers(_image_env()["WORKERS"]), 1)


class KubernetesTests(TestCase):
    def setUp(self) -> None:
        self.manifests = _kubernetes()
        self.deployment = self.manifests["Deployment"]
        pod = self.deployment["spec"]["template"]["spec"]
        self.pod = pod
        [self.container] = pod["containers"]

    def test_kustomization_applies_all_but_the_secret(self) -> None:
        resources = self.manifests["Kustomization"]["resources"]
        kinds = {
            yaml.safe_load((DEPLOY / "kubernetes" / name).read_text("utf-8"))["kind"]
            for name in resources
        }
        self.assertEqual(kinds, {"Deployment", "Service", "HorizontalPodAutoscaler"})

    def test_image_and_default_command(self) -> None:
        self.assertEqual(self.container["image"], IMAGE)
        self.assertNotIn("command", self.container)
        self.assertNotIn("args", self.container)

    def test_listens_on_the_default_port(self) -> None:
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports["http"], _default_port())

    def test_probes(self) -> None:
        readiness = self.container["readinessProbe"]["httpGet"]
        liveness = self.container["livenessProbe"]["httpGet"]
        self.assertEqual((readiness["path"], readiness["port"]), ("/readyz", "http"))
        self.assertEqual((liveness["path"], liveness["port"]), ("/healthz", "http"))

    def test_termination_grace_exceeds_drain_grace_and_pre_stop(self) -> None:
        env = _env(self.container)
        grace = float(env["GRACE"]["value"]) if "GRACE" in env else DEFAULT_GRACE
        pre_stop = self.container["lifecycle"]["preStop"]["exec"]["command"]
        pause = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], grace + pause)

    def test_secrets_come_from_secret_refs(self) -> None:
        env = _env(self.container)
        secret = self.manifests["Secret"]
        for name in SECRETS:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            self.assertEqual(
                (ref["name"], ref["key"]), (secret["metadata"]["name"], name)
            )
            self.assertNotIn("value", env[name])
            self.assertEqual(secret["stringData"][name], "")
        self.assertNotIn("optional", env["PROXY_KEY"]["valueFrom"]["secretKeyRef"])

    def test_workers_as_in_the_image_bounded_by_a_cpu_limit(self) -> None:
        workers = _env(self.container)["WORKERS"]["value"]
        self.assertEqual(workers, _image_env()["WORKERS"])
        # auto counts the CPUs the pod is given: without a limit, the node's.
        self.assertIn("cpu", self.container["resources"]["limits"])

    def test_requests_resources_for_the_autoscaler(self) -> None:
        self.assertIn("cpu", self.container["resources"]["requests"])
        self.assertIn("memory", self.container["resources"]["requests"])

    def test_service_targets_the_pods_http_port(self) -> None:
        service = self.manifests["Service"]
        self.assertEqual(
            service["spec"]["selector"],
            self.deployment["spec"]["template"]["metadata"]["labels"],
        )
        self.assertEqual(service["spec"]["ports"][0]["targetPort"], "http")

    def test_autoscaler_scales_the_deployment_on_cpu(self) -> None:
        hpa = self.manifests["HorizontalPodAutoscaler"]
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        target = hpa["spec"]["scaleTargetRef"]
        self.assertEqual(
            (target["kind"], target["name"]),
            ("Deployment", self.deployment["metadata"]["name"]),
        )
        [metric] = hpa["spec"]["metrics"]
        self.assertEqual(metric["resource"]["name"], "cpu")


class ComposeTests(TestCase):
    def setUp(self) -> None:
        self.compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text("utf-8"))
        self.proxy = self.compose["services"]["proxy"]
        self.nginx = self.compose["services"]["nginx"]
        self.conf = (DEPLOY / "nginx" / "openai-proxy.conf").read_text("utf-8")

    def test_three_replicas_of_the_image_on_the_default_port(self) -> None:
        self.assertEqual(self.proxy["image"], IMAGE)
        self.assertEqual(self.proxy["deploy"]["replicas"], 3)
        self.assertNotIn("command", self.proxy)
        self.assertIn(str(_default_port()), self.proxy["expose"])
        self.assertIn("/readyz", " ".join(self.proxy["healthcheck"]["test"]))
        self.assertIn(
            f":{_default_port()}/", " ".join(self.proxy["healthcheck"]["test"])
        )

    def test_workers_as_in_the_image(self) -> None:
        self.assertEqual(self.proxy["environment"]["WORKERS"], _image_env()["WORKERS"])

    def test_stop_grace_exceeds_drain_grace(self) -> None:
        grace = float(self.proxy["environment"].get("GRACE", DEFAULT_GRACE))
        period = self.proxy["stop_grace_period"]
        self.assertRegex(period, r"^\d+s$")
        self.assertGreater(int(period[:-1]), grace)

    def test_nginx_mounts_the_conf_and_reaches_every_replica(self) -> None:
        [volume] = self.nginx["volumes"]
        source = volume.split(":")[0]
        self.assertEqual(
            (DEPLOY / source).resolve(), DEPLOY / "nginx" / "openai-proxy.conf"
        )
        self.assertIn(f"server proxy:{_default_port()};", self.conf)

    def test_nginx_passes_websocket_upgrades(self) -> None:
        directives = {
            line.strip().rstrip(";") for line in self.conf.splitlines() if line.strip()
        }
        self.assertIn("proxy_set_header Upgrade $http_upgrade", directives)
        self.assertIn("proxy_set_header Connection $connection_upgrade", directives)
        self.assertIn("map $http_upgrade $connection_upgrade {", directives)
        self.assertIn("default upgrade", directives)

    def test_nginx_streams_server_sent_events(self) -> None:
        directives = {
            line.strip().rstrip(";") for line in self.conf.splitlines() if line.strip()
        }
        self.assertIn("proxy_buffering off", directives)
        self.assertIn("proxy_http_version 1.1", directives)
