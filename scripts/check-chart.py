"""Checks the Helm chart with Helm 4's own engine and the Kubernetes schemas, offline.

Run by tests/chart.rs with .tools/chart-venv/bin/python (scripts/setup.sh chart installs it):

- `helm lint --strict` finds nothing;
- every values combination that matters renders (CPU, GPU, trainer on/off, ServiceMonitor,
  PrometheusRule, credentials from Secrets), and every manifest validates against the schemas of
  Kubernetes 1.37 (strict: unknown fields are errors); the two Prometheus Operator kinds, which have no
  schema there, are checked for their required fields;
- every pod runs as non-root with a read-only root filesystem, no privilege escalation and no
  capabilities;
- credentials never appear in a rendered manifest: the chart renders no Secret, passes only file paths,
  and refuses a pipeline that holds a credential;
- values.schema.json refuses wrong values at install time, naming the value;
- the PrometheusRule with the default thresholds equals grafana/lineguard-alerts.yml (which promtool
  tests).

Prints one line per check; exits 1 on the first failure with what failed.
"""

import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "lineguard"
KUBERNETES = "1.37.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

RETRAIN_PIPELINE = """[kafka]
brokers = "kafka:9092"
[kafka.consumer]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
[kafka.producer]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
[metrics]
listen = "0.0.0.0:9464"
[lines.juice_bottle]
model = "/models/juice_bottle.safetensors"
input_topics = ["frames.juice_bottle"]
results_topic = "lineguard.results"
maps_topic = "lineguard.maps"
dead_letter_topic = "lineguard.dead-letter"
threshold = 0.35
[lines.juice_bottle.retrain]
accept_below = 0.28
accepted_topic = "lineguard.accepted"
models_topic = "lineguard.models"
state_dir = "/var/lib/lineguard"
"""

SECRETS = {
    "kafkaSasl": {"existingSecret": "kafka-credentials"},
    "kafkaTls": {"existingSecret": "kafka-client-tls"},
    "modelSigning": {"existingSecret": "lineguard-model-signing", "key": "key"},
}

GPU = {
    "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2", "memory": "4Gi"}},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}

COMBINATIONS = {
    "defaults (CPU)": {},
    "GPU inference, 3 replicas": {**GPU, "replicaCount": 3},
    "trainer": {"pipeline": RETRAIN_PIPELINE, "trainer": {"enabled": True}},
    "trainer on GPU": {"pipeline": RETRAIN_PIPELINE, "trainer": {"enabled": True, "resources": GPU["resources"]}},
    "ServiceMonitor and PrometheusRule": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "credentials from Secrets": {"pipeline": RETRAIN_PIPELINE, "secrets": SECRETS},
    "everything": {
        **GPU,
        "pipeline": RETRAIN_PIPELINE,
        "trainer": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "secrets": SECRETS,
        "model": {"existingClaim": "lineguard-models"},
    },
}

# Wrong values that values.schema.json must refuse, with a word the message must name.
WRONG_VALUES = {
    "replicaCount as text": ({"replicaCount": "two"}, "replicaCount"),
    "a negative replica count": ({"replicaCount": -1}, "replicaCount"),
    "an unknown pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    "a misspelt top-level key": ({"replicaCont": 2}, "replicaCont"),
    "a port out of range": ({"metrics": {"port": 70000}}, "port"),
    "a threshold as text": ({"prometheusRule": {"thresholds": {"latencyP99Seconds": "slow"}}}, "latencyP99Seconds"),
    "a duration without unit": ({"prometheusRule": {"thresholds": {"notScoringFor": "5"}}}, "notScoringFor"),
    "a Secret name that is no DNS name": ({"secrets": {"kafkaSasl": {"existingSecret": "Kafka_Creds"}}}, "existingSecret"),
}

CREDENTIAL_PIPELINES = {
    "a SASL password": '[kafka.consumer]\n"sasl.password" = "hunter2"\n',
    "a signing key": '[lines.juice_bottle.retrain]\nsigning_key = "0123456789abcdef0123"\n',
}


def fail(message):
    print(f"FAILED: {message}")
    sys.exit(1)


def render(chart, overrides):
    manifests = chart.render(overrides, name="lg", namespace="factory", is_install=True)
    documents = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                documents.append((path, document))
    return documents


def pods(documents):
    for path, document in documents:
        if document["kind"] == "Deployment":
            yield path, document["spec"]["template"]["spec"]


def check_pod_security(name, documents):
    for path, pod in pods(documents):
        where = f"{name}: {path}"
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            fail(f"{where}: the pod does not require a non-root user")
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container.get("securityContext", {})
            if context.get("readOnlyRootFilesystem") is not True:
                fail(f"{where}: {container['name']} has a writable root filesystem")
            if context.get("allowPrivilegeEscalation") is not False:
                fail(f"{where}: {container['name']} may escalate privileges")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                fail(f"{where}: {container['name']} keeps capabilities")


def check_no_credentials(name, documents):
    for path, document in documents:
        if document["kind"] == "Secret":
            fail(f"{name}: {path} renders a Secret: credentials belong in existing Secrets")
    for path, pod in pods(documents):
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if "valueFrom" in variable:
                    continue
                looks_secret = any(word in variable["name"] for word in ("PASSWORD", "SIGNING_KEY", "KEY_PEM"))
                if looks_secret and not str(variable.get("value", "")).startswith("/etc/lineguard/secrets/"):
                    fail(f"{name}: {path} passes {variable['name']} by value, not as a path to a mounted Secret")


def check_secret_wiring(documents):
    """With every credential Secret named, both Deployments mount each one and point lineguard at it."""
    deployments = [(path, pod) for path, pod in pods(documents)]
    if len(deployments) != 2:
        fail(f"expected the inference and trainer Deployments, got {[p for p, _ in deployments]}")
    for path, pod in deployments:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for volume, secret in [
            ("kafka-sasl", "kafka-credentials"),
            ("kafka-tls", "kafka-client-tls"),
            ("model-signing", "lineguard-model-signing"),
        ]:
            if volumes.get(volume, {}).get("secret", {}).get("secretName") != secret:
                fail(f"{path}: no volume {volume} from Secret {secret}")
        container = pod["containers"][0]
        env = {v["name"]: v.get("value") for v in container["env"]}
        expected = {
            "LINEGUARD__KAFKA__SECRET_FILES__SASL_USERNAME": "/etc/lineguard/secrets/kafka-sasl/username",
            "LINEGUARD__KAFKA__SECRET_FILES__SASL_PASSWORD": "/etc/lineguard/secrets/kafka-sasl/password",
            "LINEGUARD__KAFKA__SECRET_FILES__SSL_CA_PEM": "/etc/lineguard/secrets/kafka-tls/ca.crt",
            "LINEGUARD__KAFKA__SECRET_FILES__SSL_CERTIFICATE_PEM": "/etc/lineguard/secrets/kafka-tls/tls.crt",
            "LINEGUARD__KAFKA__SECRET_FILES__SSL_KEY_PEM": "/etc/lineguard/secrets/kafka-tls/tls.key",
            "LINEGUARD__LINES__JUICE_BOTTLE__RETRAIN__SIGNING_KEY_FILE": "/etc/lineguard/secrets/model-signing/key",
        }
        for name, value in expected.items():
            if env.get(name) != value:
                fail(f"{path}: {name} is {env.get(name)!r}, expected {value!r}")
        mounts = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
        for directory in ["kafka-sasl", "kafka-tls", "model-signing"]:
            if f"/etc/lineguard/secrets/{directory}" not in mounts:
                fail(f"{path}: {directory} is not mounted read-only")


def check_operator_kinds(name, path, document):
    spec = document.get("spec", {})
    if document["kind"] == "ServiceMonitor" and not spec.get("endpoints"):
        fail(f"{name}: {path}: a ServiceMonitor without endpoints")
    if document["kind"] == "PrometheusRule":
        for group in spec.get("groups", []):
            for rule in group["rules"]:
                if not rule.get("expr") or not (rule.get("alert") or rule.get("record")):
                    fail(f"{name}: {path}: incomplete rule {rule}")


def main():
    chart = helm.Chart.load(str(CHART))

    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBERNETES}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    if problems:
        fail(f"helm lint --strict: {problems}")
    print("helm lint --strict: no findings")

    validated = 0
    for name, overrides in COMBINATIONS.items():
        try:
            # The chart's defaults coalesced with the overrides, as an install would validate them.
            chart.validate_schema(chart.merge_values(overrides))
            documents = render(chart, overrides)
        except helm.HelmError as error:
            fail(f"{name}: {error}")
        kinds = sorted(d["kind"] for _, d in documents)
        for path, document in documents:
            if document["kind"] in OPERATOR_KINDS:
                check_operator_kinds(name, path, document)
                continue
            try:
                kubernetes_validate.validate(document, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as error:
                fail(f"{name}: {path} ({document['kind']}) is not valid Kubernetes {KUBERNETES}: {error.message}")
            validated += 1
        check_pod_security(name, documents)
        check_no_credentials(name, documents)
        if name == "everything":
            check_secret_wiring(documents)
        print(f"{name}: {', '.join(kinds)}")
    print(f"{validated} manifests valid against the Kubernetes {KUBERNETES} schemas (strict)")

    for name, pipeline in CREDENTIAL_PIPELINES.items():
        try:
            render(chart, {"pipeline": RETRAIN_PIPELINE + pipeline})
        except helm.HelmError as error:
            if "holds a credential" not in str(error):
                fail(f"a pipeline with {name}: refused for another reason: {error}")
            print(f"a pipeline with {name}: refused")
            continue
        fail(f"a pipeline with {name} rendered into the ConfigMap")

    for name, (overrides, word) in WRONG_VALUES.items():
        try:
            chart.validate_schema(chart.merge_values(overrides))
        except helm.HelmError as error:
            if word not in str(error):
                fail(f"{name}: refused, but the message does not name {word}: {error}")
            print(f"{name}: refused ({str(error).splitlines()[-1].strip()[:100]})")
            continue
        fail(f"{name}: accepted by values.schema.json")

    rendered = render(chart, {"prometheusRule": {"enabled": True}})
    rule = next(d for _, d in rendered if d["kind"] == "PrometheusRule")
    plain = yaml.safe_load((ROOT / "grafana" / "lineguard-alerts.yml").read_text())
    if rule["spec"]["groups"] != plain["groups"]:
        fail("the chart's PrometheusRule with default thresholds differs from grafana/lineguard-alerts.yml")
    print("the PrometheusRule with default thresholds equals grafana/lineguard-alerts.yml")
    print("SUCCESS")


if __name__ == "__main__":
    main()
