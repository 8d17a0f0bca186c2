package com.courier.client;

import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.Random;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.logging.Level;
import java.util.logging.Logger;

import okhttp3.HttpUrl;
import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.Response;
import okhttp3.WebSocket;
import okhttp3.WebSocketListener;

import org.json.JSONException;
import org.json.JSONObject;

/**
 * A Courier device: one WebSocket to {@code /v1/ws}, events handed to the app in order,
 * repeats dropped, cumulative acks coalesced, liveness checked with app pings, reconnects
 * with exponential backoff and full jitter, every close code obeyed, the token refreshed
 * in band before it expires, and the device's push token registered on each connection.
 *
 * <p>All state lives on one single-threaded executor: OkHttp's callbacks only hand their
 * frames to it, so the app's {@link Listener} runs off OkHttp's reader thread and never
 * concurrently with itself.
 */
public final class CourierClient {
    public enum State { IDLE, CONNECTING, CONNECTED, WAITING, STOPPED }

    /** Tunables; the defaults suit a phone. */
    public static final class Options {
        /** A processed event is acked within this delay (acks are cumulative and coalesced)... */
        public long ackDelayMillis = 200;
        /** ...or at once when this many processed events wait for their ack. */
        public int ackEveryEvents = 50;
        public long pingIntervalMillis = 25_000;
        public long pongTimeoutMillis = 10_000;
        public long backoffBaseMillis = 500;
        public long backoffCapMillis = 60_000;
        /** A connection that lived this long resets the backoff. */
        public long healthyMillis = 30_000;
        /** Refresh the token in band when this share of its life is left. */
        public double refreshWhenLeft = 0.10;
        public boolean refreshInBand = true;
    }

    private static final Logger LOG = Logger.getLogger("courier");

    private final HttpUrl url;
    private final OkHttpClient http;
    private final TokenProvider tokens;
    private final SeqStore store;
    private final Listener listener;
    private final Options options;
    private final ScheduledExecutorService loop;
    private final Random random = new Random();

    // Owned by the loop thread.
    private State state = State.IDLE;
    private WebSocket socket;
    private int generation;
    private int attempt;
    private long openedAt;
    private long lastSeq = -1;
    private long ackedSeq = -1;
    private long resumedFrom = -1;
    private int unacked;
    private ScheduledFuture<?> ackTimer;
    private ScheduledFuture<?> pingTimer;
    private ScheduledFuture<?> pongDeadline;
    private ScheduledFuture<?> refreshTimer;
    private ScheduledFuture<?> retryTimer;
    private String pushToken;
    private String connectionToken;
    private boolean refusedOnce;

    public CourierClient(
            String baseUrl, OkHttpClient http, TokenProvider tokens, SeqStore store,
            Listener listener) {
        this(baseUrl, http, tokens, store, listener, new Options());
    }

    public CourierClient(
            String baseUrl, OkHttpClient http, TokenProvider tokens, SeqStore store,
            Listener listener, Options options) {
        HttpUrl base = HttpUrl.get(baseUrl.replaceFirst("^ws", "http"));
        this.url = base.newBuilder().encodedPath("/v1/ws").build();
        this.http = http;
        this.tokens = tokens;
        this.store = store;
        this.listener = listener;
        this.options = options;
        this.loop = Executors.newSingleThreadScheduledExecutor(r -> {
            Thread t = new Thread(r, "courier-client");
            t.setDaemon(true);
            return t;
        });
    }

    // -- the app's side --------------------------------------------------------------------

    /** Connects (again, after a stop); does nothing while connected or connecting. */
    public void connect() {
        loop.execute(() -> {
            if (state == State.CONNECTING || state == State.CONNECTED) {
                return;
            }
            cancel(retryTimer);
            attempt = 0;
            refusedOnce = false;
            open();
        });
    }

    /** Closes the connection and stays idle until {@link #connect()}. */
    public void disconnect() {
        loop.execute(() -> {
            flushAck();
            stopTimers();
            cancel(retryTimer);
            generation++;
            if (socket != null) {
                socket.close(1000, "bye");
                socket = null;
            }
            setState(State.IDLE);
        });
    }

    /** Drops the connection at once and reconnects (after a network change, or in tests). */
    public void reconnectNow() {
        loop.execute(() -> {
            if (socket != null) {
                socket.cancel(); // onFailure follows: a reconnect with backoff
            } else if (state == State.WAITING) {
                cancel(retryTimer);
                open();
            }
        });
    }

    /** The device's FCM token: sent now if connected, and on every later connection. */
    public void registerPushToken(String fcmToken) {
        loop.execute(() -> {
            pushToken = fcmToken;
            if (state == State.CONNECTED) {
                sendPush();
            }
        });
    }

    /**
     * A push arrived: a hint that events wait. Connects now if idle or waiting to retry (the
     * backoff's attempt count is kept); a connected client gets the events live anyway. A
     * stopped client stays stopped (after a 4009 another install holds this device id).
     */
    public void onPushReceived() {
        loop.execute(() -> {
            if (state == State.WAITING || state == State.IDLE) {
                cancel(retryTimer);
                open();
            } else if (state == State.STOPPED) {
                LOG.info("courier: a push while stopped; connect() on the next foreground");
            }
        });
    }

    /** Stops everything and frees the client's thread. */
    public void shutdown() {
        disconnect();
        loop.shutdown();
    }

    // -- connecting ------------------------------------------------------------------------

    private void open() {
        long resume;
        try {
            resume = store.load();
            connectionToken = tokens.token();
        } catch (RuntimeException e) {
            LOG.log(Level.WARNING, "courier: the app's store or token provider failed", e);
            retry(null, false);
            return;
        }
        lastSeq = resume;
        resumedFrom = resume;
        ackedSeq = -1; // what the server's cursor holds is not known: ack lastSeq on hello
        unacked = 0;
        HttpUrl.Builder target = url.newBuilder();
        if (resume >= 0) {
            target.addQueryParameter("after", Long.toString(resume));
        }
        Request request = new Request.Builder()
                .url(target.build())
                .header("Authorization", "Bearer " + connectionToken)
                .build();
        final int mine = ++generation;
        setState(State.CONNECTING);
        socket = http.newWebSocket(request, new WebSocketListener() {
            @Override
            public void onOpen(WebSocket ws, Response response) {
                loop.execute(() -> { if (mine == generation) opened(); });
            }

            @Override
            public void onMessage(WebSocket ws, String text) {
                loop.execute(() -> { if (mine == generation) frame(text); });
            }

            @Override
            public void onClosing(WebSocket ws, int code, String reason) {
                ws.close(code, null);
                loop.execute(() -> { if (mine == generation) closed(code, reason); });
            }

            @Override
            public void onFailure(WebSocket ws, Throwable t, Response response) {
                Integer status = response == null ? null : response.code();
                String body = null;
                String retryAfter = null;
                if (response != null) {
                    retryAfter = response.header("Retry-After");
                    try {
                        body = response.body() == null ? null : response.body().string();
                    } catch (Exception ignored) {
                        body = null;
                    }
                }
                final String text = body;
                final String wait = retryAfter;
                loop.execute(() -> { if (mine == generation) failed(status, text, wait, t); });
            }
        });
    }

    private void opened() {
        openedAt = System.currentTimeMillis();
        refusedOnce = false;
        setState(State.CONNECTED);
        schedulePing();
    }

    private void frame(String text) {
        JSONObject frame;
        try {
            frame = new JSONObject(text);
        } catch (JSONException e) {
            LOG.warning("courier: a frame that is not JSON: " + text);
            return;
        }
        heard();
        switch (frame.optString("type")) {
            case "hello":
                hello(frame);
                break;
            case "event":
                event(frame);
                break;
            case "auth_ok":
                LOG.info("courier: token renewed until " + frame.optLong("exp"));
                break;
            case "push_ok":
                LOG.fine("courier: push token registered");
                break;
            case "error":
                LOG.warning("courier: " + frame.optString("code") + ": " + frame.optString("message"));
                break;
            default:
                break; // pong, and frame types of later versions
        }
    }

    private void hello(JSONObject frame) {
        long after = frame.optLong("after", -1);
        if (resumedFrom >= 0 && after >= 0 && after < resumedFrom) {
            // The server lowered our after= to the user's newest seq: its stream is behind the
            // app's state (a reset ledger, another server). Seqs above `after` are new events,
            // so they must not be dropped as repeats.
            LOG.warning("courier: resumed after " + resumedFrom + " but the stream ends at " + after);
            lastSeq = after;
            store.save(after);
            tell(() -> listener.onResyncNeeded(
                    "the server's stream ends at seq " + after + ", below the app's " + resumedFrom));
        }
        if (frame.optBoolean("truncated")) {
            tell(() -> listener.onResyncNeeded(
                    "events after seq " + after + " were deleted before this device got them"));
        }
        // The acks of the last connection may have been lost with it: bring the server's
        // cursor up to what was processed (never above `after`, the connection's position).
        flushAck();
        if (pushToken != null) {
            sendPush();
        }
        scheduleRefresh(connectionToken); // the one this connection expires with
    }

    private void event(JSONObject frame) {
        CourierEvent event;
        try {
            event = new CourierEvent(frame);
        } catch (JSONException e) {
            LOG.warning("courier: an event frame it cannot read: " + e.getMessage());
            return;
        }
        if (event.seq <= lastSeq) {
            return; // a repeat around a reconnect: processed already
        }
        try {
            listener.onEvent(event);
        } catch (Exception e) {
            LOG.log(Level.WARNING, "courier: the app failed on " + event + "; it comes again", e);
            if (socket != null) {
                socket.cancel();
            }
            return;
        }
        lastSeq = event.seq;
        store.save(event.seq);
        if (++unacked >= options.ackEveryEvents) {
            flushAck();
        } else if (ackTimer == null) {
            ackTimer = loop.schedule(this::flushAck, options.ackDelayMillis, TimeUnit.MILLISECONDS);
        }
    }

    /** Acks {@code lastSeq}, the highest processed seq, if the server has not had it yet. */
    private void flushAck() {
        cancel(ackTimer);
        ackTimer = null;
        if (socket != null && state == State.CONNECTED && lastSeq > 0 && lastSeq > ackedSeq) {
            socket.send("{\"type\":\"ack\",\"seq\":" + lastSeq + "}");
            ackedSeq = lastSeq;
            unacked = 0;
        }
    }

    private void sendPush() {
        JSONObject frame = new JSONObject();
        try {
            frame.put("type", "push").put("provider", "fcm").put("token", pushToken);
        } catch (JSONException e) {
            throw new IllegalStateException(e);
        }
        socket.send(frame.toString());
    }

    // -- liveness and the token ------------------------------------------------------------

    private void schedulePing() {
        cancel(pingTimer);
        pingTimer = loop.scheduleAtFixedRate(() -> {
            if (socket != null && state == State.CONNECTED && pongDeadline == null) {
                socket.send("{\"type\":\"ping\"}");
                pongDeadline = loop.schedule(() -> {
                    LOG.info("courier: no answer to a ping; reconnecting");
                    pongDeadline = null;
                    if (socket != null) {
                        socket.cancel();
                    }
                }, options.pongTimeoutMillis, TimeUnit.MILLISECONDS);
            }
        }, options.pingIntervalMillis, options.pingIntervalMillis, TimeUnit.MILLISECONDS);
    }

    private void heard() {
        cancel(pongDeadline);
        pongDeadline = null;
    }

    private void scheduleRefresh(String token) {
        cancel(refreshTimer);
        if (!options.refreshInBand) {
            return;
        }
        long now = System.currentTimeMillis();
        long exp = claimMillis(token, "exp");
        if (exp <= 0) {
            return;
        }
        long issued = claimMillis(token, "iat");
        long from = issued > 0 && issued <= now ? issued : now;
        long life = Math.max(0, exp - from);
        long at = Math.max(0, exp - (long) (life * options.refreshWhenLeft) - now);
        refreshTimer = loop.schedule(this::refreshInBand, at, TimeUnit.MILLISECONDS);
    }

    private void refreshInBand() {
        refreshTimer = null;
        if (socket == null || state != State.CONNECTED) {
            return;
        }
        try {
            String fresh = tokens.refresh();
            JSONObject frame = new JSONObject().put("type", "auth").put("token", fresh);
            socket.send(frame.toString());
            connectionToken = fresh;
            scheduleRefresh(fresh);
        } catch (Exception e) {
            LOG.log(Level.WARNING, "courier: token refresh failed; the server will close with 4001", e);
        }
    }

    /**
     * A time claim ({@code exp}, {@code iat}) of a JWT in milliseconds, or 0 if it cannot be
     * read. The payload is only decoded: the server checks the signature.
     */
    static long claimMillis(String jwt, String claim) {
        try {
            String[] parts = jwt.split("\\.");
            byte[] payload = Base64.getUrlDecoder().decode(parts[1]);
            return new JSONObject(new String(payload, StandardCharsets.UTF_8)).getLong(claim) * 1000;
        } catch (RuntimeException | JSONException e) {
            return 0;
        }
    }

    // -- ends ------------------------------------------------------------------------------

    private void closed(int code, String reason) {
        socket = null;
        stopTimers();
        switch (code) {
            case 4009:
                stop("replaced by a newer connection of this device (4009)");
                return;
            case 4010:
                stop("evicted: the user connected more devices than allowed (4010)");
                return;
            case 4001:
                // Never again with the same token: a new one first, then at once.
                retry(null, refresh());
                return;
            default:
                retry(null, false); // 1006, 1011, 1012, 1013, 4008, 4029 and any other code
        }
    }

    private void failed(Integer status, String body, String retryAfter, Throwable cause) {
        socket = null;
        stopTimers();
        if (status == null) {
            LOG.fine("courier: connection lost: " + cause);
            retry(null, false); // no answer at all: network down, DNS, a dropped connection
            return;
        }
        String code = errorCode(body);
        if (status == 401 && "token_expired".equals(code)) {
            retry(null, refresh());
        } else if (status == 401 && "bad_token".equals(code) && !refusedOnce) {
            // One new token; refused again means a configuration mismatch.
            boolean fresh = refresh();
            refusedOnce = fresh;
            retry(null, fresh);
        } else if (status == 408 || status == 429 || status >= 500) {
            retry(parseSeconds(retryAfter), false); // transient, no sooner than Retry-After
        } else {
            // 401 again or missing_token, 400, 403, 404, 414, 431: a client or configuration bug.
            stop("refused: HTTP " + status + (code.isEmpty() ? "" : " " + code));
        }
    }

    private boolean refresh() {
        try {
            tokens.refresh();
            return true;
        } catch (Exception e) {
            LOG.log(Level.WARNING, "courier: could not get a new token", e);
            return false;
        }
    }

    /**
     * Connects again after a backoff: {@code random(0, min(cap, base * 2^attempt))} (full
     * jitter), no sooner than {@code atLeastSeconds}. With {@code atOnceIfFirst} (a new token
     * was fetched) the first attempt is immediate; a loop of them still backs off, since the
     * attempt count is reset only by a connection that stayed up for a healthy period.
     */
    private void retry(Long atLeastSeconds, boolean atOnceIfFirst) {
        if (openedAt > 0 && System.currentTimeMillis() - openedAt >= options.healthyMillis) {
            attempt = 0;
        }
        openedAt = 0;
        long delay;
        if (atOnceIfFirst && attempt == 0) {
            delay = 0;
        } else {
            long ceiling = Math.min(options.backoffCapMillis,
                    options.backoffBaseMillis * (1L << Math.min(attempt, 20)));
            delay = (long) (random.nextDouble() * (ceiling + 1));
        }
        if (atLeastSeconds != null) {
            delay = Math.max(delay, atLeastSeconds * 1000);
        }
        attempt++;
        if (delay == 0) {
            open();
            return;
        }
        setState(State.WAITING);
        retryTimer = loop.schedule(this::open, delay, TimeUnit.MILLISECONDS);
    }

    private void stop(String reason) {
        setState(State.STOPPED);
        tell(() -> listener.onStopped(reason));
    }

    private void stopTimers() {
        cancel(ackTimer);
        ackTimer = null;
        cancel(pingTimer);
        cancel(pongDeadline);
        pongDeadline = null;
        cancel(refreshTimer);
    }

    private void setState(State next) {
        if (state != next) {
            state = next;
            tell(() -> listener.onState(next));
        }
    }

    /** Calls the app; a failing callback is logged, it must not stop the client's thread. */
    private static void tell(Runnable call) {
        try {
            call.run();
        } catch (RuntimeException e) {
            LOG.log(Level.WARNING, "courier: a Listener callback failed", e);
        }
    }

    private static void cancel(ScheduledFuture<?> timer) {
        if (timer != null) {
            timer.cancel(false);
        }
    }

    private static String errorCode(String body) {
        try {
            return new JSONObject(body).getJSONObject("error").getString("code");
        } catch (RuntimeException | JSONException e) {
            return "";
        }
    }

    private static Long parseSeconds(String value) {
        try {
            return value == null ? null : Long.parseLong(value.trim());
        } catch (NumberFormatException e) {
            return null;
        }
    }
}
