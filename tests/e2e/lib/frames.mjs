// Hand-built client frames with exact bytes, for scenarios the real client never produces.
// Valid frames come from secsync's own exported builders (createInitialSnapshot,
// createSnapshot, createUpdate, createEphemeralMessage); `signFrame` re-signs arbitrary
// publicData following PROTOCOL.md 2.3/2.5 so a test can change one field and keep the
// signature valid (then the server must object to that field, not to the signature).

import * as Y from "yjs";
import { canonicalize, secsync, sodium } from "./deps.mjs";

export const DOMAIN = {
  snapshot: "secsync_snapshot",
  update: "secsync_update",
  ephemeral: "secsync_ephemeral_message",
};

/** The parentSnapshotProof every first snapshot carries (PROTOCOL.md 2.6). */
export const INITIAL_PARENT_SNAPSHOT_PROOF = "k_CZR7BveaeM7FOc0TYtEtTtTi0ElwG9XrDVLxb9tR0";

export function newAuthor() {
  const keyPair = sodium.crypto_sign_keypair();
  return { keyPair, pubKey: sodium.to_base64(keyPair.publicKey) };
}

export function newDocumentKey() {
  return sodium.randombytes_buf(32);
}

/** Yjs V2 state of a document whose text is `text`, as the real client would snapshot it. */
export function yjsStateWithText(text) {
  const doc = new Y.Doc();
  doc.getText("text").insert(0, text);
  return Y.encodeStateAsUpdateV2(doc);
}

/** An update payload the real client can apply: serialised list of Yjs V2 updates. */
export function yjsChangesAppending(baseState, text) {
  const doc = new Y.Doc();
  if (baseState) Y.applyUpdateV2(doc, baseState);
  const before = Y.encodeStateVector(doc);
  const ytext = doc.getText("text");
  ytext.insert(ytext.length, text);
  return secsync.serializeUint8ArrayUpdates([Y.encodeStateAsUpdateV2(doc, before)], sodium);
}

export function initialSnapshot({ docId, author, key, content = yjsStateWithText(""), snapshotId }) {
  return secsync.createInitialSnapshot(
    content,
    {
      docId,
      pubKey: author.pubKey,
      snapshotId: snapshotId ?? secsync.generateId(sodium),
      parentSnapshotId: "",
      parentSnapshotUpdateClocks: {},
    },
    key,
    author.keyPair,
    sodium,
  );
}

/** A child of `parent` (a snapshot frame object) carrying `parentSnapshotUpdateClocks`. */
export function childSnapshot({ docId, author, key, parent, parentSnapshotUpdateClocks = {}, content = yjsStateWithText("") }) {
  return secsync.createSnapshot(
    content,
    {
      docId,
      pubKey: author.pubKey,
      snapshotId: secsync.generateId(sodium),
      parentSnapshotId: parent.publicData.snapshotId,
      parentSnapshotUpdateClocks,
    },
    key,
    author.keyPair,
    secsync.hash(parent.ciphertext, sodium),
    parent.publicData.parentSnapshotProof,
    sodium,
  );
}

export function update({ docId, author, key, refSnapshotId, clock, content = yjsChangesAppending(null, "x") }) {
  return secsync.createUpdate(content, { docId, pubKey: author.pubKey, refSnapshotId }, key, author.keyPair, clock, sodium);
}

let ephemeralCounter = 1;
export function ephemeral({ docId, author, key, content = new Uint8Array([1, 2, 3]), type = "message" }) {
  const sessionId = secsync.generateId(sodium);
  return secsync.createEphemeralMessage(
    content,
    type,
    { docId, pubKey: author.pubKey },
    key,
    author.keyPair,
    sessionId,
    ephemeralCounter++,
    sodium,
  );
}

/** base64url(canonical JSON of publicData), the signed form of publicData (PROTOCOL.md 2.3). */
export function publicDataB64(publicData) {
  return sodium.to_base64(canonicalize(publicData));
}

/** Re-sign `frame` (with whatever publicData it now has) by `keyPair` under `domain`. */
export function signFrame(frame, domain, keyPair) {
  const signed = `${domain}${canonicalize({
    ciphertext: frame.ciphertext,
    nonce: frame.nonce,
    publicData: publicDataB64(frame.publicData),
  })}`;
  return { ...frame, signature: sodium.to_base64(sodium.crypto_sign_detached(signed, keyPair.privateKey)) };
}

/** A copy of `frame` with a signature by some other key (publicData.pubKey unchanged). */
export function withForeignSignature(frame, domain) {
  return signFrame(frame, domain, newAuthor().keyPair);
}

/** Check a frame's signature the way clients and servers do. */
export function verifyFrame(frame, domain) {
  try {
    return secsync.verifySignature(
      { nonce: frame.nonce, ciphertext: frame.ciphertext, publicData: publicDataB64(frame.publicData) },
      domain,
      frame.signature,
      sodium.from_base64(frame.publicData.pubKey),
      sodium,
    );
  } catch {
    return false;
  }
}
