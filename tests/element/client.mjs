// One simulated Element device: matrix-js-sdk with Rust crypto (initRustCrypto), as Element Web
// runs it, driven by the Python tests (tests/element_client.py).
//
// Protocol: one JSON object per line. stdin gets {"id", "cmd", "args"}; stdout answers
// {"id", "result"} or {"id", "error": {"message", "errcode", "status"}}. Nothing else is ever
// written to stdout: all logging goes to stderr, which the Python side sends to a log file.

// Node 20: the SDK and the crypto bindings expect Node 22's Promise.withResolvers. It must exist
// before the SDK is evaluated, which is why the SDK is loaded with a dynamic import below.
if (!Promise.withResolvers) {
    Promise.withResolvers = function withResolvers() {
        let resolve, reject;
        const promise = new this((res, rej) => { resolve = res; reject = rej; });
        return { promise, resolve, reject };
    };
}

// The SDK's logger (loglevel) and the Rust crypto's tracing both write through console.*, and
// console.log/info/debug go to stdout in Node: point them all at stderr to keep stdout clean.
for (const name of ["log", "info", "debug", "trace"]) console[name] = console.error;

import { createInterface } from "node:readline";
// The Rust crypto store lives in IndexedDB; fake-indexeddb provides it (in this process's memory).
import "fake-indexeddb/auto";

const sdk = await import("matrix-js-sdk");
const cryptoApi = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { logger } = await import("matrix-js-sdk/lib/logger.js");

let client = null;
let session = null; // {baseUrl, userId, deviceId, accessToken, password}
let recoveryKey = null; // the secret storage key, once known (bootstrap or recover)

const until = async (check, timeoutMs, what) => {
    // Poll with a deadline: the SDK state we wait for is updated by the sync loop.
    const deadline = Date.now() + timeoutMs;
    for (;;) {
        const value = await check();
        if (value) return value;
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 100));
    }
};

async function startClient() {
    // Element keeps its sync state in IndexedDB too. A restart must resume from the saved sync
    // token: a second initial sync of the same device within two minutes gets Synapse's cached
    // answer to the first one (rooms joined since then are missing).
    const store = new sdk.IndexedDBStore({ indexedDB: globalThis.indexedDB, dbName: `element-sync-${session.deviceId}` });
    await store.startup();
    client = sdk.createClient({
        baseUrl: session.baseUrl,
        store,
        userId: session.userId,
        deviceId: session.deviceId,
        accessToken: session.accessToken,
        cryptoCallbacks: {
            // Asked when secret storage is read (recover) or written (bootstrap).
            getSecretStorageKey: async ({ keys }) => {
                if (!recoveryKey) return null;
                const keyId = (await client.secretStorage.getDefaultKeyId()) ?? Object.keys(keys)[0];
                return [keyId, recoveryKey];
            },
        },
    });
    // A per-device store name, so a restart in this process finds the same Olm account.
    await client.initRustCrypto({ useIndexedDB: true, cryptoDatabasePrefix: `element-${session.deviceId}` });
    const prepared = new Promise((resolve, reject) => {
        const onSync = (state, _prev, data) => {
            if (state === "PREPARED" || state === "SYNCING") { client.off(sdk.ClientEvent.Sync, onSync); resolve(); }
            if (state === "ERROR") { client.off(sdk.ClientEvent.Sync, onSync); reject(data?.error ?? new Error("sync failed")); }
        };
        client.on(sdk.ClientEvent.Sync, onSync);
    });
    // Element's settings: lazy-loaded members. Threads are left in the main timeline
    // (threadSupport off) so that messages() sees every event of the room in one list.
    await client.startClient({ lazyLoadMembers: true, initialSyncLimit: 20, threadSupport: false });
    await prepared;
    // The Rust crypto uploads the device's keys in the background, possibly after the first sync.
    // Until the one-time keys are up, a sender that sees the device cannot open an Olm session to
    // it (keys/claim comes back empty) and that message's key never reaches this device. A test
    // that mails right after a login must not race that, so "started" means "keys published".
    await until(async () => {
        const counts = await client.http.authedRequest("POST", "/keys/upload", undefined, {});
        return (counts.one_time_key_counts?.signed_curve25519 ?? 0) > 0;
    }, 60000, "this device's one-time keys to be uploaded");
}

const commands = {
    async start({ homeserver, user_id, password, device_name }) {
        // Password login, as Element does on a fresh browser: a new device every time.
        const anon = sdk.createClient({ baseUrl: homeserver });
        const login = await anon.loginRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: user_id },
            password,
            initial_device_display_name: device_name,
        });
        session = { baseUrl: homeserver, userId: login.user_id, deviceId: login.device_id,
                    accessToken: login.access_token, password };
        await startClient();
        return { user_id: session.userId, device_id: session.deviceId };
    },

    async restart() {
        // Stop syncing and start again on the same device and crypto store (a page reload).
        await client.store.save(true);
        client.stopClient();
        await startClient();
        return { device_id: session.deviceId };
    },

    async rooms() {
        return client.getRooms().map((room) => ({
            room_id: room.roomId,
            membership: room.getMyMembership(),
            name: room.name,
            encrypted: room.hasEncryptionStateEvent(),
            inviter: room.getMember(session.userId)?.events.member?.getSender() ?? null,
            members: room.getJoinedMembers().map((m) => m.userId),
        }));
    },

    async join({ room_id, timeout_ms = 60000 }) {
        const deadline = Date.now() + timeout_ms;
        for (;;) {
            try {
                await client.joinRoom(room_id);
                break;
            } catch (err) {
                // Synapse's rc_joins: wait as long as the server says, then try again (as Element does).
                if (err.errcode !== "M_LIMIT_EXCEEDED" || Date.now() > deadline) throw err;
                const wait = err.getRetryAfterMs?.() ?? err.data?.retry_after_ms ?? 1000;
                logger.warn(`join ${room_id}: rate limited, retrying in ${wait} ms`);
                await new Promise((r) => setTimeout(r, wait));
            }
        }
        // The join counts once our own sync has seen it (the room is then in the store as joined).
        await until(() => client.getRoom(room_id)?.getMyMembership() === "join", Math.max(deadline - Date.now(), 5000),
                    `the join of ${room_id} to sync`);
        return { room_id };
    },

    async messages({ room_id }) {
        const room = client.getRoom(room_id);
        if (!room) throw new Error(`unknown room ${room_id}`);
        // Scroll back to the room's start: a room joined late has more history than the sync gave.
        // At the start the timeline has no back token and this returns false without a request.
        const timeline = room.getLiveTimeline();
        while (await client.paginateEventTimeline(timeline, { backwards: true, limit: 100 }));
        const events = room.getLiveTimeline().getEvents();
        return Promise.all(events.map(describe));
    },

    async send({ room_id, type = "m.room.message", content }) {
        const { event_id } = await client.sendEvent(room_id, type, content);
        return { event_id };
    },

    async download({ file }) {
        // Encrypted attachment (EncryptedFile): authenticated media download, then AES-CTR and the
        // SHA-256 check, as Element's matrix-encrypt-attachment does with WebCrypto.
        const url = client.mxcUrlToHttp(file.url, undefined, undefined, undefined, false, true, true);
        const resp = await fetch(url, { headers: { Authorization: `Bearer ${session.accessToken}` } });
        if (!resp.ok) throw new Error(`download ${file.url}: HTTP ${resp.status}`);
        const cipher = new Uint8Array(await resp.arrayBuffer());
        const digest = Buffer.from(await crypto.subtle.digest("SHA-256", cipher)).toString("base64").replace(/=+$/, "");
        if (digest !== file.hashes.sha256.replace(/=+$/, "")) throw new Error("attachment hash mismatch");
        const key = await crypto.subtle.importKey("jwk", file.key, { name: "AES-CTR" }, false, ["decrypt"]);
        const iv = Buffer.from(file.iv, "base64");
        const plain = await crypto.subtle.decrypt({ name: "AES-CTR", counter: iv, length: 64 }, key, cipher);
        return { data_b64: Buffer.from(plain).toString("base64"), cipher_b64: Buffer.from(cipher).toString("base64") };
    },

    async bootstrap_cross_signing({ password, recovery = false }) {
        const crypto_ = client.getCrypto();
        await crypto_.bootstrapCrossSigning({
            authUploadDeviceSigningKeys: async (makeRequest) => {
                // User-interactive auth: the first call returns the session, the second answers it.
                try {
                    await makeRequest(null);
                } catch (err) {
                    if (err.httpStatus !== 401 || !err.data?.session) throw err;
                    await makeRequest({
                        type: "m.login.password",
                        identifier: { type: "m.id.user", user: session.userId },
                        password: password ?? session.password,
                        session: err.data.session,
                    });
                }
            },
        });
        let encoded = null;
        if (recovery) {
            // Element's "set up recovery": a secret storage key, with the cross-signing keys in it.
            const key = await crypto_.createRecoveryKeyFromPassphrase();
            recoveryKey = key.privateKey;
            // As Element's "Set up recovery" dialog: with a new key backup (room keys go there).
            await crypto_.bootstrapSecretStorage({ createSecretStorageKey: async () => key, setupNewSecretStorage: true,
                                                   setupNewKeyBackup: true });
            encoded = key.encodedPrivateKey;
        }
        return { ...(await status()), recovery_key: encoded };
    },

    async recover({ recovery_key }) {
        // Element's "verify with recovery key" on a new device: read the cross-signing keys out of
        // secret storage and sign this device with them.
        recoveryKey = cryptoApi.decodeRecoveryKey(recovery_key);
        await client.getCrypto().bootstrapCrossSigning({});
        // The signature is uploaded; this device's own view of it comes with the next key query,
        // which the sync's device-list change for our own user sets off.
        await until(async () => (await status()).device_signed_by_owner, 30000, "our device's signature to sync");
        // Then, as Element does after verification: the backup key from secret storage, the key
        // backup switched on, and the room keys other devices backed up restored (old mail).
        const restored = await restoreBackup();
        return { ...(await status()), ...restored };
    },

    async restore_key_backup() { return restoreBackup(); },

    async device_status({ user_id, device_id }) {
        // How this device sees another device (or itself), once its keys are downloaded.
        const c = client.getCrypto();
        await c.getUserDeviceInfo([user_id], true);
        const s = await c.getDeviceVerificationStatus(user_id, device_id);
        return s && { cross_signing_verified: s.crossSigningVerified, signed_by_owner: s.signedByOwner,
                      locally_verified: s.localVerified, verified: s.isVerified() };
    },

    async status() { return status(); },

    async stop() {
        client?.stopClient();
        setImmediate(() => process.exit(0));
        return {};
    },
};

async function restoreBackup() {
    const c = client.getCrypto();
    if (!(await c.getKeyBackupInfo())) return { backup_version: null, imported: 0, total: 0 };
    await c.loadSessionBackupPrivateKeyFromSecretStorage();
    const check = await c.checkKeyBackupAndEnable();
    const result = await c.restoreKeyBackup();
    return { backup_version: check?.backupInfo?.version ?? null, imported: result.imported, total: result.total };
}

async function status() {
    const c = client.getCrypto();
    const own = await c.getDeviceVerificationStatus(session.userId, session.deviceId);
    return { cross_signing_ready: await c.isCrossSigningReady(),
             device_signed_by_owner: own?.signedByOwner ?? false,
             device_cross_signing_verified: own?.crossSigningVerified ?? false };
}

async function describe(ev) {
    // Wait out a decryption in flight; a failure is not final, since the Rust crypto retries when
    // the key arrives later (the Python side polls messages() until its deadline).
    if (ev.isBeingDecrypted()) await ev.getDecryptionPromise();
    const encrypted = ev.isEncrypted();
    const failed = ev.isDecryptionFailure();
    let shield = null;
    if (encrypted && !failed) {
        // The shield Element draws next to the message.
        const info = await client.getCrypto().getEncryptionInfoForEvent(ev);
        if (info) {
            shield = { colour: cryptoApi.EventShieldColour[info.shieldColour],
                       reason: info.shieldReason === null ? null : cryptoApi.EventShieldReason[info.shieldReason] };
        }
    }
    return {
        event_id: ev.getId(), sender: ev.getSender(), type: ev.getType(), wire_type: ev.getWireType(),
        state_key: ev.getStateKey() ?? null, ts: ev.getTs(), encrypted, decrypted: encrypted && !failed,
        decryption_failure: failed ? ev.decryptionFailureReason : null, content: ev.getContent(), shield,
    };
}

function reply(msg) { process.stdout.write(JSON.stringify(msg) + "\n"); }

// Commands run concurrently (a join can wait on the sync while messages() is asked for).
const rl = createInterface({ input: process.stdin });
rl.on("line", async (line) => {
    if (!line.trim()) return;
    const { id, cmd, args } = JSON.parse(line);
    try {
        const fn = commands[cmd];
        if (!fn) throw new Error(`unknown command ${cmd}`);
        reply({ id, result: (await fn(args ?? {})) ?? null });
    } catch (err) {
        logger.warn(`command ${cmd} failed`, err);
        reply({ id, error: { message: String(err?.message ?? err), errcode: err?.errcode ?? null,
                             status: err?.httpStatus ?? null, data: err?.data ?? null } });
    }
});
// The Python side went away: nothing left to do for this device.
rl.on("close", () => { client?.stopClient(); process.exit(0); });
