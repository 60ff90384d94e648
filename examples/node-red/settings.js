// Node-RED settings for running examples/node-red/flows.json on its own:
//   MQTT_HOST=127.0.0.1 MQTT_PORT=1883 PROJECT=maze CLIENT_ID=node-red \
//     npx node-red --settings settings.js --userDir ./data flows.json
// The flow reads these from the environment; the defaults below apply when they are unset.
process.env.MQTT_HOST ??= "127.0.0.1";
process.env.MQTT_PORT ??= "1883";
process.env.PROJECT ??= "maze";
process.env.CLIENT_ID ??= "node-red";
process.env.REPLY_TOPIC ??= `${process.env.PROJECT}/response/${process.env.CLIENT_ID}`;
process.env.DEVICE_ID ??= "lamp-1"; // the device tool tab: its tools are called on {project}/tools/{DEVICE_ID}/...
process.env.TOOLS_TOPIC ??= `${process.env.PROJECT}/tools/${process.env.DEVICE_ID}/#`;

module.exports = {
  uiHost: "127.0.0.1", // the editor has no login here: loopback only
  uiPort: Number(process.env.PORT || 1880),
  flowFile: "flows.json",
  credentialSecret: false,
  logging: { console: { level: "info", metrics: false, audit: false } },
  editorTheme: { tours: false },
};
