// A stock Yjs client (yjs 13.6 + y-websocket 3.1 + ws), driven by tests/coedit.rs over
// stdin/stdout, one JSON object per line.
//
// usage: node coedit-peer.mjs <wsBase e.g. ws://127.0.0.1:PORT/ws/docs> <documentId> <token> [quiet]
//   "quiet": the client's awareness has no local state, so it never sends anything while
//   idle (only the server's keep-alive can hold the connection open).
//
// Commands: {"id":1,"cmd":"..."} → a reply {"id":1,...}. Events: {"event":"..."}.
//   waitSynced, edits {n, seed}, insert {index, text}, text, state (base64 update),
//   quiesce {ms}, disconnect, connect, awareness {state}, peers, stats, exit,
//   cursor {anchor, head, mode?} (the awareness `cursor` of y-codemirror / y-prosemirror:
//   relative positions in Yjs JSON form; anchor null removes it), clientId.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import * as authProtocol from 'y-protocols/auth'
import WebSocket from 'ws'
import * as readline from 'node:readline'

const [base, docId, token, mode] = process.argv.slice(2)
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const doc = new Y.Doc()
const text = doc.getText('content')
const provider = new WebsocketProvider(base, docId, doc, {
  params: token ? { token } : {},
  WebSocketPolyfill: WebSocket, // Node 20 has no global WebSocket
  disableBc: true // else providers in one process sync without the server
})
const stats = { connects: 0, closes: 0, denied: 0, synced: 0 }
provider.on('status', (e) => {
  if (e.status === 'connected') stats.connects++
  out({ event: 'status', status: e.status })
})
provider.on('connection-close', (e) => {
  stats.closes++
  out({ event: 'close', code: e ? e.code : null, reason: e && e.reason ? String(e.reason) : '' })
})
provider.on('sync', (ok) => {
  if (ok) stats.synced++
  out({ event: 'synced', synced: ok })
})
// The permission-denied message only console.warns in y-websocket: report it instead.
provider.messageHandlers[2] = (_encoder, decoder, p) => {
  authProtocol.readAuthMessage(decoder, p.doc, (_ydoc, reason) => {
    stats.denied++
    out({ event: 'denied', reason })
  })
}
if (mode === 'quiet') {
  provider.awareness.setLocalState(null)
} else {
  provider.awareness.setLocalState({ user: { name: 'peer-' + process.pid } })
}
provider.awareness.on('change', ({ added, updated, removed }) => {
  const others = (ids) => ids.filter((id) => id !== doc.clientID)
  if (others(added).length || others(removed).length) {
    out({ event: 'awareness', added: others(added), removed: others(removed) })
  }
})

let lastUpdate = Date.now()
doc.on('update', () => { lastUpdate = Date.now() })
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function waitSynced () {
  while (!provider.synced) await sleep(20)
}

async function edits (n, seed) {
  let s = seed >>> 0
  const rnd = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32)
  for (let i = 0; i < n; i++) {
    const len = text.length
    if (len > 0 && rnd() < 0.3) {
      text.delete(Math.floor(rnd() * len), 1)
    } else {
      text.insert(Math.floor(rnd() * (len + 1)), String.fromCharCode(97 + Math.floor(rnd() * 26)))
    }
    if (i % 50 === 0) await sleep(1)
  }
}

async function handle (msg) {
  switch (msg.cmd) {
    case 'waitSynced': await waitSynced(); return {}
    case 'edits': await edits(msg.n, msg.seed); return {}
    case 'insert': text.insert(Math.min(msg.index, text.length), msg.text); return {}
    case 'text': return { text: text.toString() }
    case 'state': return { state: Buffer.from(Y.encodeStateAsUpdate(doc)).toString('base64') }
    case 'quiesce': {
      const ms = msg.ms || 1000
      while (Date.now() - lastUpdate < ms) await sleep(50)
      return { text: text.toString() }
    }
    case 'disconnect': provider.disconnect(); return {}
    case 'connect': provider.connect(); return {}
    case 'awareness': provider.awareness.setLocalState(msg.state); return {}
    case 'cursor': {
      const state = { ...(provider.awareness.getLocalState() || {}) }
      const rel = (i) => Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(text, i))
      if (msg.anchor === null || msg.anchor === undefined) {
        delete state.cursor
      } else {
        state.cursor = { anchor: rel(msg.anchor), head: rel(msg.head ?? msg.anchor) }
      }
      if (msg.mode) state.mode = msg.mode
      provider.awareness.setLocalState(state)
      return {}
    }
    case 'clientId': return { clientId: doc.clientID }
    case 'peers': {
      const peers = []
      provider.awareness.getStates().forEach((state, id) => {
        if (id !== doc.clientID) peers.push({ id, state })
      })
      return { peers }
    }
    case 'stats': return { ...stats, wsconnected: provider.wsconnected, synced: provider.synced }
    case 'exit':
      provider.destroy()
      setTimeout(() => process.exit(0), 50)
      return {}
    default: return { error: 'unknown command ' + msg.cmd }
  }
}

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let msg
  try { msg = JSON.parse(line) } catch { return out({ error: 'bad json' }) }
  try {
    out({ id: msg.id, ...(await handle(msg)) })
  } catch (e) {
    out({ id: msg.id, error: String(e && e.stack ? e.stack : e) })
  }
})
rl.on('close', () => { provider.destroy(); process.exit(0) })
