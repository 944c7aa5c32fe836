// Validates the objects of the custom kinds (KEDA, Prometheus operator) read as JSON from stdin
// against their CRDs' schemas, as packaged by @kubernetes-models (npm). Prints one line per object;
// exits 1 on the first invalid one.
const modules = process.argv[2];
const kinds = {
  'keda.sh/v1alpha1/ScaledObject': '@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject',
  'keda.sh/v1alpha1/TriggerAuthentication': '@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication',
  'monitoring.coreos.com/v1/ServiceMonitor': '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor',
  'monitoring.coreos.com/v1/PrometheusRule': '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule',
  'monitoring.coreos.com/v1alpha1/ScrapeConfig': '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1/ScrapeConfig',
};
const objects = JSON.parse(require('fs').readFileSync(0, 'utf8'));
for (const o of objects) {
  const key = `${o.apiVersion}/${o.kind}`;
  const path = kinds[key];
  if (!path) {
    console.error(`no schema for ${key} (${o.metadata.name})`);
    process.exit(1);
  }
  const Model = Object.values(require(`${modules}/${path}`))[0];
  try {
    new Model(o).validate();
  } catch (e) {
    console.error(`invalid ${key} ${o.metadata.name}: ${e.message}`);
    process.exit(1);
  }
  console.log(`valid: ${key} ${o.metadata.name}`);
}
