package com.courier.client;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.concurrent.TimeUnit;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.LogRecord;
import java.util.logging.Logger;

import okhttp3.OkHttpClient;

import org.json.JSONObject;

/**
 * Drives a {@link CourierClient} for the test suite: args {@code <base url> <token file>
 * [name=value ...]} with the names {@code in-band} (true/false), {@code ack-delay}
 * (milliseconds) and {@code seq} (the store's last processed seq at start). The token
 * provider reads the token file (the test writes a new token there before it is needed).
 * Prints one JSON line per event, state, refresh, resync, stop and client log record;
 * reads commands from stdin: {@code drop} (cut the connection), {@code disconnect},
 * {@code connect}, {@code push <token>}, {@code pushed} (a push arrived), {@code quit}.
 */
public final class Driver {
    public static void main(String[] args) throws Exception {
        String base = args[0];
        Path tokenFile = Paths.get(args[1]);
        Map<String, String> named = new HashMap<>();
        for (int i = 2; i < args.length; i++) {
            String[] pair = args[i].split("=", 2);
            named.put(pair[0], pair[1]);
        }
        Logger log = Logger.getLogger("courier");
        log.setLevel(Level.ALL);
        log.setUseParentHandlers(false);
        log.addHandler(new Handler() {
            @Override
            public void publish(LogRecord record) {
                print("log", record.getMessage());
            }

            @Override
            public void flush() {}

            @Override
            public void close() {}
        });
        AtomicInteger refreshes = new AtomicInteger();
        TokenProvider tokens = new TokenProvider() {
            @Override
            public String token() {
                try {
                    return new String(Files.readAllBytes(tokenFile), StandardCharsets.UTF_8).trim();
                } catch (Exception e) {
                    throw new IllegalStateException(e);
                }
            }

            @Override
            public String refresh() {
                print("refresh", refreshes.incrementAndGet());
                return token();
            }
        };
        Listener listener = new Listener() {
            @Override
            public void onEvent(CourierEvent event) {
                print("event", event.seq, "id", event.id, "kind", event.kind,
                        "collapse", event.collapse == null ? JSONObject.NULL : event.collapse);
            }

            @Override
            public void onResyncNeeded(String reason) {
                print("resync", reason);
            }

            @Override
            public void onState(CourierClient.State state) {
                print("state", state.name());
            }

            @Override
            public void onStopped(String reason) {
                print("stopped", reason);
            }
        };
        CourierClient.Options options = new CourierClient.Options();
        options.ackDelayMillis = Long.parseLong(named.getOrDefault("ack-delay", "50"));
        options.backoffBaseMillis = 100;
        options.backoffCapMillis = 1000;
        options.pingIntervalMillis = 1000;
        options.pongTimeoutMillis = 2000;
        options.refreshInBand = Boolean.parseBoolean(named.getOrDefault("in-band", "true"));
        options.refreshWhenLeft = 0.5;
        OkHttpClient http = new OkHttpClient.Builder().connectTimeout(5, TimeUnit.SECONDS).build();
        SeqStore store = new MemorySeqStore(Long.parseLong(named.getOrDefault("seq", "-1")));
        CourierClient client = new CourierClient(base, http, tokens, store, listener, options);
        client.connect();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            if (line.equals("drop")) {
                client.reconnectNow();
            } else if (line.startsWith("push ")) {
                client.registerPushToken(line.substring(5));
            } else if (line.equals("disconnect")) {
                client.disconnect();
            } else if (line.equals("connect")) {
                client.connect();
            } else if (line.equals("pushed")) {
                client.onPushReceived();
            } else if (line.equals("quit")) {
                break;
            }
        }
        client.shutdown();
        http.dispatcher().executorService().shutdown();
        http.connectionPool().evictAll();
        print("quit", true);
        System.exit(0);
    }

    /** One JSON line of the given names and values. */
    private static synchronized void print(Object... pairs) {
        JSONObject line = new JSONObject();
        try {
            for (int i = 0; i < pairs.length; i += 2) {
                line.put((String) pairs[i], pairs[i + 1]);
            }
        } catch (org.json.JSONException e) {
            throw new IllegalStateException(e);
        }
        System.out.println(line);
        System.out.flush();
    }
}
