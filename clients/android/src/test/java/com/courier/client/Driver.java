package com.courier.client;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import okhttp3.OkHttpClient;

import org.json.JSONObject;

/**
 * Drives a {@link CourierClient} for the test suite: args {@code <base url> <token file>
 * [in-band|no-in-band]}. The token provider reads the token file (the test writes a new
 * token there before it is needed). Prints one JSON line per event, state, refresh and
 * stop; reads commands from stdin: {@code drop} (cut the connection), {@code push <token>},
 * {@code quit}.
 */
public final class Driver {
    public static void main(String[] args) throws Exception {
        String base = args[0];
        Path tokenFile = Paths.get(args[1]);
        boolean inBand = args.length < 3 || !"no-in-band".equals(args[2]);
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
            public void onState(CourierClient.State state) {
                print("state", state.name());
            }

            @Override
            public void onStopped(String reason) {
                print("stopped", reason);
            }
        };
        CourierClient.Options options = new CourierClient.Options();
        options.ackDelayMillis = 50;
        options.backoffBaseMillis = 100;
        options.backoffCapMillis = 1000;
        options.pingIntervalMillis = 1000;
        options.pongTimeoutMillis = 2000;
        options.refreshInBand = inBand;
        options.refreshWhenLeft = 0.5;
        OkHttpClient http = new OkHttpClient.Builder().connectTimeout(5, TimeUnit.SECONDS).build();
        CourierClient client = new CourierClient(base, http, tokens, new MemorySeqStore(), listener, options);
        client.connect();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            if (line.equals("drop")) {
                client.reconnectNow();
            } else if (line.startsWith("push ")) {
                client.registerPushToken(line.substring(5));
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
