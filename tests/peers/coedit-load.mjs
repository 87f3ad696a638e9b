// The load of `inkwire bench coedit`: stock Yjs clients (yjs + y-websocket, unchanged) typing
// into shared documents on any y-websocket server — inkwire's `/ws/docs` or the reference
// `@y/websocket-server` — so both are measured on the same load by the same clients.
//
// usage: node coedit-load.mjs '<json>' where json is
//   { "base": "ws://127.0.0.1:PORT/ws/docs", "docs": [{ "id": "d1", "tokens": ["t1", "t2"] }],
//     "rate": 5, "seconds": 10, "settleMs": 3000 }
// Every client of every document inserts one character at a random place `rate` times a
// second for `seconds` (an editor's pace) and moves its awareness cursor with each; then the
// clients wait until no update arrived for `settleMs`. Latency is timed per inserted character
// from just before the sender's insert until each other client of the document has it: the
// clients share this process, so the sender's clock is the receivers' clock. Prints one JSON
// line: {sent, received, expected, seconds, deliveredSeconds, p50Ms, p99Ms, maxMs, converged,
// lengths}.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const cfg = JSON.parse(process.argv[2])
const settleMs = cfg.settleMs ?? 3000
let seed = 12345
const rnd = () => ((seed = (seed * 1664525 + 1013904223) >>> 0) / 2 ** 32)

// `${client}:${clock}` of an inserted character → when it was inserted.
const sentAt = new Map()
const samples = []
let received = 0
let lastReceivedAt = 0
let lastUpdate = Date.now()

const connect = (docId, token, i) => new Promise((resolve, reject) => {
  const doc = new Y.Doc()
  const text = doc.getText('content')
  const provider = new WebsocketProvider(cfg.base, docId, doc, {
    params: token ? { token } : {},
    WebSocketPolyfill: WebSocket,
    disableBc: true
  })
  provider.awareness.setLocalState({ user: { name: `bench-${docId}-${i}` }, cursor: 0 })
  // What a remote transaction added is each client's clock range between its state before
  // and after the transaction: one character per clock.
  doc.on('afterTransaction', tr => {
    if (tr.local) return
    const now = performance.now()
    lastUpdate = Date.now()
    for (const [client, after] of tr.afterState) {
      for (let clock = tr.beforeState.get(client) || 0; clock < after; clock++) {
        const at = sentAt.get(`${client}:${clock}`)
        if (at !== undefined) {
          samples.push(now - at)
          received += 1
          lastReceivedAt = now
        }
      }
    }
  })
  const timer = setTimeout(() => reject(new Error(`${docId}: no sync within 15 s`)), 15000)
  provider.once('sync', ok => {
    clearTimeout(timer)
    if (ok) resolve({ docId, doc, text, provider })
  })
})

const clients = []
for (const d of cfg.docs) {
  for (let i = 0; i < d.tokens.length; i++) clients.push(await connect(d.id, d.tokens[i], i))
}

const started = performance.now()
const endAt = started + cfg.seconds * 1000
const interval = 1000 / cfg.rate
let sent = 0
let expected = 0
const receiversOf = new Map()
for (const d of cfg.docs) receiversOf.set(d.id, d.tokens.length - 1)

// Each client types on its own timer, started at a random offset so the load is even.
await Promise.all(clients.map(c => new Promise(resolve => {
  const tick = () => {
    if (performance.now() >= endAt) return resolve()
    const len = c.text.length
    const clock = Y.getState(c.doc.store, c.doc.clientID)
    sentAt.set(`${c.doc.clientID}:${clock}`, performance.now())
    const at = Math.floor(rnd() * (len + 1))
    c.text.insert(at, String.fromCharCode(97 + Math.floor(rnd() * 26)))
    c.provider.awareness.setLocalStateField('cursor', at + 1)
    sent += 1
    expected += receiversOf.get(c.docId)
    setTimeout(tick, interval)
  }
  setTimeout(tick, rnd() * interval)
})))
const typedSeconds = (performance.now() - started) / 1000

// Settle: every update delivered (or nothing more for settleMs).
lastUpdate = Date.now()
while (received < expected && Date.now() - lastUpdate < settleMs) {
  await new Promise(r => setTimeout(r, 20))
}

samples.sort((a, b) => a - b)
const pct = p => samples.length ? samples[Math.min(samples.length - 1, Math.floor(p * samples.length))] : 0
let converged = true
const lengths = {}
for (const d of cfg.docs) {
  const texts = clients.filter(c => c.docId === d.id).map(c => c.text.toString())
  if (texts.some(t => t !== texts[0])) converged = false
  lengths[d.id] = texts[0].length
}
console.log(JSON.stringify({
  sent, received, expected, seconds: typedSeconds,
  // From the first insert until the last one reached its last receiver.
  deliveredSeconds: Math.max(lastReceivedAt - started, 1) / 1000,
  p50Ms: pct(0.5), p99Ms: pct(0.99), maxMs: samples.length ? samples[samples.length - 1] : 0,
  converged, lengths
}))
for (const c of clients) c.provider.destroy()
process.exit(0)
