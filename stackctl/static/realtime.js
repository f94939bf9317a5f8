// stackctl's browser client: follows channels over a websocket, reconnects by itself with
// backoff and jitter, and resumes from the last message id it saw, so that a restart of the
// worker or a lost network costs the page nothing.
//
//   const feed = new StackctlFeed(["news", "user:alice"], {
//     // Called at each (re)connection: the server closes a connection when its token expires.
//     token: () => fetch("/realtime-token").then((r) => r.json()).then((j) => j.token),
//     onmessage: (data, message) => console.log(message.channel, message.id, data),
//     // Some of what was missed while away is older than the history keeps: fetch afresh.
//     ongap: (channel) => reloadFromServer(channel),
//   });
//   feed.publish("chat", {text: "hi"});   // only to channels the profile opens to clients
"use strict";

const TOKEN_EXPIRED = 4401;

class StackctlFeed {
  constructor(channels, options = {}) {
    this.channels = channels;
    this.prefix = options.prefix || "/ws/";
    this.token = options.token || null;
    this.onmessage = options.onmessage || (() => {});
    this.onstatus = options.onstatus || (() => {});
    this.ongap = options.ongap || (() => {});
    this.lastId = options.since || null;
    this.minDelay = options.minDelay || 250;
    this.maxDelay = options.maxDelay || 10000;
    this.attempts = 0;
    this.closed = false;
    this.connect();
  }

  async url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams();
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (token) query.set("token", token);
    if (this.lastId) query.set("since", this.lastId);
    const names = this.channels.map(encodeURIComponent).join(",");
    return `${scheme}//${location.host}${this.prefix}${names}?${query}`;
  }

  async connect() {
    let url;
    try {
      url = await this.url();
    } catch (error) {
      this.retry(`no token: ${error}`);
      return;
    }
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.attempts = 0;
      this.onstatus("open");
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.error) {
        this.onstatus(`error: ${message.error}`);
        return;
      }
      if (message.gap) {
        this.ongap(message.channel);
        return;
      }
      this.lastId = message.id;
      this.onmessage(message.data, message);
    };
    socket.onclose = (event) => {
      if (this.closed) return;
      if (event.code === TOKEN_EXPIRED) {
        // The server ends a connection when its token expires: come back at once, with a
        // fresh token if `token` is a function (it is called at each connection).
        this.onstatus("token expired; reconnecting");
        this.connect();
        return;
      }
      this.retry(`closed (${event.code})`);
    };
  }

  retry(why) {
    // Exponential backoff with full jitter, so that thousands of pages reconnecting after a
    // restart do not all knock at once.
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempts);
    const delay = Math.random() * ceiling;
    this.attempts += 1;
    this.onstatus(`${why}; reconnecting in ${Math.round(delay)} ms`);
    setTimeout(() => this.connect(), delay);
  }

  publish(channel, data) {
    this.socket.send(JSON.stringify({channel, data}));
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000);
  }
}

window.StackctlFeed = StackctlFeed;
