// Ask a vllm-worker project from an ESP32 over MQTT (PubSubClient), the classic protocol.
// Mirrors examples/micropython/ask.py line for line: request JSON on {project}/user_input, the answer as
// plain text on {project}/assistant_response/{sessionId}; an answer starting "Error: " is a refusal.
// Libraries: PubSubClient (Nick O'Leary). Not compiled in this repo's CI (no toolchain): see README.md.
#include <WiFi.h>
#include <PubSubClient.h>

const char* WIFI_SSID = "your-ssid";
const char* WIFI_PASSWORD = "your-password";
const char* BROKER = "192.168.1.10";  // the Mosquitto host (deploy/: app listener 1883)
const int PORT = 1883;
const char* USER = nullptr;  // with deploy/'s ACL: an app account, e.g. "app"
const char* PASSWORD = nullptr;
const char* PROJECT = "maze";
const char* SESSION = "robot-1";  // the conversation: the worker keeps its history
const unsigned long TIMEOUT_MS = 30000;
const char* ERROR_PREFIX = "Error: ";

WiFiClient net;
PubSubClient client(net);
String requestTopic = String(PROJECT) + "/user_input";
String replyTopic = String(PROJECT) + "/assistant_response/" + SESSION;
String answer;
bool answered = false;

void onMessage(char* topic, byte* payload, unsigned int length) {
  answer = String((const char*)payload, length);
  answered = true;
}

bool connectBroker() {
  String clientId = String("esp-") + SESSION + "-" + String(millis());
  client.setServer(BROKER, PORT);
  client.setCallback(onMessage);
  client.setBufferSize(4096);  // answers longer than the default 256 bytes
  client.setKeepAlive(60);
  if (!client.connect(clientId.c_str(), USER, PASSWORD)) return false;
  return client.subscribe(replyTopic.c_str(), 1);
}

// The answer text; "" after TIMEOUT_MS; *refused is set on an "Error: " reply. Reconnects once.
String ask(const String& message, bool* refused) {
  *refused = false;
  String body = "{\"message\": \"" + jsonEscape(message) + "\", \"sessionId\": \"" + SESSION + "\"}";
  for (int attempt = 0; attempt < 2; attempt++) {
    if (!client.connected() && !connectBroker()) { delay(500); continue; }
    answered = false;
    if (!client.publish(requestTopic.c_str(), body.c_str())) { client.disconnect(); delay(500); continue; }
    unsigned long started = millis();
    while (!answered) {
      client.loop();
      if (millis() - started > TIMEOUT_MS) return "";
      delay(10);
    }
    if (answer.startsWith(ERROR_PREFIX)) { *refused = true; return answer.substring(strlen(ERROR_PREFIX)); }
    return answer;
  }
  return "";
}

String jsonEscape(const String& s) {
  String out;
  for (unsigned int i = 0; i < s.length(); i++) {
    char c = s[i];
    if (c == '"' || c == '\\') { out += '\\'; out += c; }
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void setup() {
  Serial.begin(115200);
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
  while (WiFi.status() != WL_CONNECTED) delay(250);
  bool refused;
  String text = ask("Which way to the exit?", &refused);
  if (refused) Serial.println("refused: " + text);
  else if (text.length() == 0) Serial.println("no answer within 30 s");
  else Serial.println(text);
}

void loop() {
  client.loop();  // keep the connection (and the session's place) alive
}
