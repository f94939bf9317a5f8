// The demo board's client, on stackctl's realtime.js: it reconnects and resumes by itself.
(function () {
  "use strict";
  var board = document.getElementById("board");
  var state = document.getElementById("state");
  var form = document.getElementById("post");
  var SHOWN = 50; // the newest messages; older ones leave the board

  // A new visitor starts from the first id: the channel's history (what Redis keeps of it)
  // comes first, so the board shows what was said before the page opened.
  new window.StackctlFeed([document.currentScript.dataset.channel], {
    since: "0-0",
    onstatus: function (status) { state.textContent = status === "open" ? "live" : status; },
    onmessage: function (data) {
      var item = document.createElement("li");
      item.textContent = data.text;
      board.insertBefore(item, board.firstChild);
      while (board.children.length > SHOWN) board.removeChild(board.lastChild);
    },
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    fetch("/post", { method: "POST", body: body, headers: { Accept: "application/json" } })
      .then(function () { form.reset(); });
  });
}());
