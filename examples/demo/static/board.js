// The demo board's client, on stackctl's realtime.js: it reconnects and resumes by itself.
(function () {
  "use strict";
  var board = document.getElementById("board");
  var state = document.getElementById("state");
  var form = document.getElementById("post");

  new window.StackctlFeed([document.currentScript.dataset.channel], {
    onstatus: function (status) { state.textContent = status === "open" ? "live" : status; },
    onmessage: function (data) {
      var item = document.createElement("li");
      item.textContent = data.text;
      board.insertBefore(item, board.firstChild);
    },
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    fetch("/post", { method: "POST", body: body, headers: { Accept: "application/json" } })
      .then(function () { form.reset(); });
  });
}());
